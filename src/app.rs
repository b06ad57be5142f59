//! Start-up and shutdown: [`Application::build`] wires configuration into a store, the
//! dataset, the engine and the router, and binds the listener; `run_until_stopped`
//! serves until a stop is asked for, then drains. `main` and the tests share this path.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::server::ServeOptions;
use crate::api::{self, AppContext, AppState, RouterOptions};
use crate::config::{Cli, Command, ServeConfig};
use crate::csv::{self, datasets::DataDir};
use crate::jobs::engine::Engine;
use crate::jobs::{self, EngineOptions, Registry};
use crate::lifecycle::{Component, Tasks};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::queue::{self, LeaseOptions, OpenOptions};
use crate::series::ingest::{self, Ingester, TcpOptions};
use crate::series::rollup::Rollups;
use crate::series::sources::{self, FlagDefaults, Sources};
use crate::series::store::SeriesStore;
use crate::stats::{self, Dataset};
use crate::store::sqlite::SqliteOptions;
use crate::store::StoreSpec;
use crate::telemetry;

pub struct Application {
    listener: TcpListener,
    /// `--compat-get-sum-bind`: `/getSum` and `/healthz` only.
    compat_listener: Option<TcpListener>,
    /// `--line-listen`: line protocol over TCP.
    line_listener: Option<TcpListener>,
    state: AppState,
    cfg: ServeConfig,
}

/// How long a Redis command may take before the store counts as unavailable (a
/// submission then answers 503 instead of hanging).
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the service stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Signal,
    Route,
}

impl Application {
    pub async fn build(cfg: ServeConfig) -> anyhow::Result<Self> {
        // Bind first: a second instance on a busy port fails before touching the store.
        let listener = TcpListener::bind(cfg.bind)
            .await
            .with_context(|| format!("binding {}", cfg.bind))?;
        let compat_listener = match cfg.compat_get_sum_bind {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --compat-get-sum-bind {addr}"))?,
            ),
            None => None,
        };
        let line_listener = match cfg.line_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --line-listen {addr}"))?,
            ),
            None => None,
        };
        // Sources are validated before anything is opened: a bad one names itself.
        let source_specs = sources::load_specs(
            &cfg.sources,
            &FlagDefaults {
                interval_ms: cfg.source_interval_ms,
                concurrency: cfg.source_concurrency,
                timeout_ms: cfg.source_timeout_ms,
            },
            cfg.config.as_deref(),
            cfg.enable_test_jobs,
        )?;
        let metrics = Arc::new(Metrics::new());
        let series = Arc::new(SeriesStore::new(cfg.series_options(), &metrics));
        let ingest = Arc::new(Ingester::new(series.clone(), &metrics));
        let sources = Arc::new(Sources::new(source_specs, series.clone(), &metrics));
        let rollups = Rollups::new(series.clone(), &metrics);
        let lease = LeaseOptions {
            lease: Duration::from_millis(cfg.lease_ms),
            max_attempts: cfg.max_attempts,
        };
        let (store, queue) = queue::open(
            &cfg.store,
            OpenOptions {
                capacity: cfg.queue_capacity as usize,
                workers: cfg.worker_count(),
                lease,
                result_ttl: Duration::from_secs(cfg.result_ttl),
                redis_response_timeout: REDIS_RESPONSE_TIMEOUT,
                sqlite: SqliteOptions {
                    sync: cfg.sqlite_sync,
                    commit_delay: Duration::from_micros(cfg.sqlite_commit_delay_us),
                },
                memory_max_results: cfg.memory_max_results,
            },
            &metrics,
        )
        .await?;
        let dataset = match &cfg.stats_dataset {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || Dataset::load_path(&path))
                    .await?
                    .context("loading --stats-dataset")?
            }
            None => Dataset::sample().context("loading the bundled sample dataset")?,
        };
        let s = dataset.summary;
        tracing::info!(
            rows = s.rows,
            used = s.used,
            empty_values = s.empty_values,
            bad_values = s.bad_values,
            short_rows = s.short_rows,
            questions = dataset.question_count(),
            source = %cfg.stats_dataset.as_ref().map_or("bundled sample".to_string(), |p| p.display().to_string()),
            "statistics dataset loaded"
        );

        let mut registry = Registry::default();
        stats::register(
            &mut registry,
            Arc::new(dataset),
            Arc::new(|parts: &[&str]| api::compat::python_tuple(parts)),
        );
        let data_dir = DataDir::new(&cfg.data_dir);
        csv::job::register(&mut registry, data_dir.clone());
        if cfg.enable_test_jobs {
            jobs::testing::register(&mut registry);
        }
        let engine = Engine::start(
            queue,
            store.clone(),
            registry,
            &metrics,
            EngineOptions {
                workers: cfg.worker_count(),
                job_timeout: cfg.job_timeout(),
                lease,
            },
        );
        if let Err(e) = engine.recover().await {
            // Stop what was started before giving up, so nothing outlives the failure.
            engine.shutdown(Instant::now()).await;
            let _ = store.close().await;
            return Err(anyhow::Error::new(e).context("recovering unfinished jobs"));
        }

        let journal = cfg.journal_path();
        if journal.is_none() && matches!(cfg.store, StoreSpec::Redis(_)) {
            // Said at every start: the pipeline is per replica on Redis (issue: one
            // ordered pipeline across replicas), and without a file nothing is kept.
            tracing::warn!(
                "the ordered pipeline writes no journal: --store is redis and --journal is not \
                 set, so POST /v1/events acknowledges events that are ordered and then dropped; \
                 give this replica a --journal of its own to keep them"
            );
        }
        let pipeline = match Pipeline::start(
            PipelineOptions {
                journal,
                process_delay_max_ms: cfg.process_delay_max_ms,
                reorder_capacity: cfg.reorder_capacity as usize,
            },
            &metrics,
        ) {
            Ok(p) => p,
            Err(e) => {
                engine.shutdown(Instant::now()).await;
                let _ = store.close().await;
                return Err(anyhow::Error::new(e).context("opening the pipeline journal"));
            }
        };

        let state: AppState = Arc::new(AppContext {
            engine,
            http_metrics: api::HttpMetrics::register(&metrics),
            server_metrics: api::server::ServerMetrics::register(&metrics),
            gauges: api::state::Gauges::register(&metrics),
            metrics,
            auth: cfg.auth_token.clone(),
            shutdown: CancellationToken::new(),
            poll_hold: Duration::from_millis(cfg.poll_hold_ms),
            idempotency_ttl: Duration::from_secs(cfg.idempotency_ttl),
            datasets: data_dir,
            max_upload_bytes: cfg.max_upload_bytes,
            pipeline,
            series,
            ingest,
            rollups,
            max_write_bytes: cfg.max_write_bytes,
            sources,
        });
        tracing::info!(
            addr = %listener.local_addr()?,
            store = %cfg.store,
            workers = cfg.worker_count(),
            queue_capacity = cfg.queue_capacity,
            auth = cfg.auth_token.is_some(),
            "tally is listening"
        );
        if let Some(addr) = compat_listener.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!(%addr, "serving /getSum on its own listener");
        }
        if let Some(addr) = line_listener.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!(%addr, "accepting line protocol over TCP");
        }
        Ok(Application {
            listener,
            compat_listener,
            line_listener,
            state,
            cfg,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The address of `--compat-get-sum-bind`, when set.
    pub fn compat_addr(&self) -> Option<SocketAddr> {
        self.compat_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The address of `--line-listen`, when set.
    pub fn line_addr(&self) -> Option<SocketAddr> {
        self.line_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `stop` resolves or `/api/graceful_shutdown` is called, then drains
    /// and stops every component in this order (ARCHITECTURE.md, "Start and stop"):
    /// stop intake; drain the engine (until `--shutdown-timeout`) and stop it; drain the
    /// pipeline and stop its writers; flush and close the store; stop the series tasks
    /// and listeners; stop HTTP. (The log is flushed by `run_cli` when this returns.)
    pub async fn run_until_stopped(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            compat_listener,
            line_listener,
            state,
            cfg,
        } = self;
        // Live series: the rollup scheduler, the sources, the TCP line listener and the
        // /getSum listener, stopped together.
        let series = SeriesTasks::start(&state, &cfg, line_listener, compat_listener);
        let http = ServeOptions::new(&cfg, state.server_metrics.clone());
        let router = api::router(
            state.clone(),
            RouterOptions {
                max_body_bytes: cfg.max_body_bytes,
                test_routes: cfg.enable_test_jobs,
                allowed_origins: cfg.allowed_origins.clone(),
                hosts: crate::origin::HostPolicy::new(
                    &[cfg.bind.ip()],
                    &cfg.allowed_hosts,
                    &cfg.allowed_origins,
                ),
            },
        );
        let http_tasks = Tasks::new();
        let http_stop = http_tasks.token();
        http_tasks.spawn(async move {
            let served = api::server::serve(listener, router, http, async move {
                http_stop.cancelled().await
            })
            .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "HTTP server ended with an error");
            }
        });

        let reason = tokio::select! {
            _ = stop => StopReason::Signal,
            _ = state.shutdown.cancelled() => StopReason::Route,
        };
        // Whatever asked for it, the drain begins now: long-lived responses (the
        // dashboard's event streams) end at once rather than hold up the HTTP stop.
        state.shutdown.cancel();
        let engine = state.engine.clone();
        let pipeline = state.pipeline.clone();
        // 1. Stop intake: new jobs and events get 503 (or "shutting down" on /api).
        engine.begin_drain();
        pipeline.begin_drain();
        let deadline = Instant::now() + Duration::from_secs(cfg.shutdown_timeout);
        tracing::info!(
            ?reason,
            live = engine.live_jobs(),
            timeout_s = cfg.shutdown_timeout,
            "draining"
        );
        // 2. Drain the engine, then stop it (workers, sweeper, completions joined);
        // 3. drain the pipeline and stop its writers.
        let jobs = Jobs(engine.clone());
        let events = Events(pipeline);
        for c in [&jobs as &dyn Component, &events] {
            c.shutdown(deadline).await;
            tracing::debug!(component = c.name(), "stopped");
        }
        if reason == StopReason::Route {
            // Let pollers see `num_jobs: 0` and `graceful_shutdown: done` before we go.
            tokio::time::sleep(Duration::from_millis(cfg.shutdown_linger_ms)).await;
        }
        // 4. Flush and close the store (its threads end; its file lock is released);
        // 5. stop the series tasks and listeners; 6. stop HTTP: open connections get up
        // to 5 s to finish their requests.
        let store = StoreHandle(engine.clone());
        let http = HttpTasks(http_tasks);
        for c in [&store as &dyn Component, &series, &http] {
            c.shutdown(Instant::now() + Duration::from_secs(5)).await;
            tracing::debug!(component = c.name(), "stopped");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The live series' background tasks: the rollup scheduler, one supervisor per source,
/// the TCP line listener and the `/getSum` listener, under one [`Tasks`].
struct SeriesTasks {
    tasks: Tasks,
}

impl SeriesTasks {
    fn start(
        state: &AppState,
        cfg: &ServeConfig,
        line_listener: Option<TcpListener>,
        compat_listener: Option<TcpListener>,
    ) -> SeriesTasks {
        let tasks = Tasks::new();
        let stop = tasks.token();
        tasks.spawn(
            state
                .rollups
                .scheduler(Duration::from_secs(cfg.rollup_interval), stop.clone()),
        );
        for supervisor in state.sources.supervisors(&stop) {
            tasks.spawn(supervisor);
        }
        if let Some(l) = line_listener {
            tasks.spawn(ingest::serve_tcp(
                l,
                state.ingest.clone(),
                TcpOptions {
                    precision: cfg.line_precision,
                    max_connections: cfg.line_max_connections as usize,
                    idle_timeout: Duration::from_millis(cfg.line_idle_timeout_ms),
                },
                stop.clone(),
            ));
        }
        if let Some(l) = compat_listener {
            let router = api::series::compat_get_sum_router(state.clone());
            let http = ServeOptions::new(cfg, state.server_metrics.clone());
            tasks.spawn(async move {
                let served =
                    api::server::serve(l, router, http, async move { stop.cancelled().await })
                        .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "the /getSum listener ended with an error");
                }
            });
        }
        SeriesTasks { tasks }
    }
}

#[async_trait]
impl Component for SeriesTasks {
    fn name(&self) -> &'static str {
        "series"
    }

    async fn shutdown(&self, deadline: Instant) {
        if !self.tasks.stop(deadline).await {
            tracing::warn!("the series tasks did not stop in time");
        }
    }
}

/// The job engine's part of the drain: intake is already closed; wait until every job
/// this process holds has finished (until `deadline`), then stop the engine.
struct Jobs(Engine);

#[async_trait]
impl Component for Jobs {
    fn name(&self) -> &'static str {
        "jobs"
    }

    async fn shutdown(&self, deadline: Instant) {
        if self.0.wait_idle(deadline).await {
            tracing::info!("drain complete: every accepted job finished");
        } else {
            tracing::warn!(
                unfinished = self.0.live_jobs(),
                "drain deadline passed; unfinished jobs stay in the store and run at the next start"
            );
        }
        self.0.shutdown(deadline).await;
    }
}

/// The pipeline's part of the drain: intake is already closed; wait until every accepted
/// event is journaled (until `deadline`), then stop its writers after a last fdatasync.
/// What is left unjournaled is replayed from the accepted log at the next start.
struct Events(Pipeline);

#[async_trait]
impl Component for Events {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    async fn shutdown(&self, deadline: Instant) {
        if self.0.wait_idle(deadline).await {
            tracing::info!("pipeline drained: every accepted event is journaled");
        } else {
            tracing::warn!(
                unjournaled = self.0.in_flight(),
                "pipeline drain deadline passed; the rest is journaled from the accepted log at the next start"
            );
        }
        self.0.close().await;
    }
}

/// The store, flushed and closed last among the data (its threads end, its file lock is
/// released). A close takes what it takes: the deadline is not the store's to cut.
struct StoreHandle(Engine);

#[async_trait]
impl Component for StoreHandle {
    fn name(&self) -> &'static str {
        "store"
    }

    async fn shutdown(&self, _deadline: Instant) {
        if let Err(e) = self.0.close_store().await {
            tracing::error!(error = %e, "closing the store failed; what was not written is lost");
        }
    }
}

/// The HTTP listener's task and the connections it serves.
struct HttpTasks(Tasks);

#[async_trait]
impl Component for HttpTasks {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn shutdown(&self, deadline: Instant) {
        if !self.0.stop(deadline).await {
            tracing::warn!("open HTTP connections did not close within 5 s");
        }
    }
}

/// Waits for SIGINT or SIGTERM. Once one arrived, a second one exits the process at
/// once, without draining.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining (send it again to exit at once)"),
            _ = int.recv() => tracing::info!("SIGINT: draining (press Ctrl-C again to exit at once)"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now without draining");
            std::process::exit(130);
        });
    })
}

pub fn run_cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(cfg) => {
            // A file size limit (RLIMIT_FSIZE) must fail the write, as a full disk does,
            // not kill the process: the store then reports itself unavailable and
            // recovers once writes succeed again.
            // SAFETY: setting a signal's disposition to "ignore" has no preconditions.
            unsafe {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            }
            let _log = telemetry::init_as(
                cfg.log_format,
                &cfg.log_level,
                cfg.log_file.as_deref(),
                cfg.log_max_bytes,
                cfg.log_backups,
            )?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("tally-io")
                .build()
                .context("starting the async runtime")?;
            let result = rt.block_on(async move {
                let stop = shutdown_signal()?;
                let app = Application::build(cfg).await?;
                app.run_until_stopped(stop).await
            });
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "tally failed");
            }
            // Worker threads may still be inside a job past the drain deadline: do not
            // wait for them, the store already has what it needs.
            rt.shutdown_timeout(Duration::from_millis(100));
            result
        }
        Command::Sum(args) => crate::cli::sum::run(&args),
        Command::Load(args) => crate::cli::load::run(&args),
        Command::Upstream(args) => crate::cli::upstream::run(&args),
    }
}
