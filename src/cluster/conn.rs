//! The connection to Redis: one server, or a Redis Cluster when the URL says so
//! (`redis+cluster://`) or the server does (`INFO cluster` answers `cluster_enabled:1`).
//!
//! Every key tally writes shares the `{tally}` hash tag, so on a cluster every script,
//! pipeline and blocking move goes to the one master owning that slot; the cluster client
//! (the redis crate's) learns the slot map from whichever node the URL names, follows
//! `MOVED` and `ASK`, and finds the new master after a failover. Pub/sub needs no
//! routing: a message published on one node of a cluster reaches subscribers on every
//! node, so the finished-jobs channel is read from the node the URL names.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

const NO_DB: &str = "Redis Cluster has only database 0: drop the /DB from the --store URL";

/// The scheme that asks for a cluster client whatever the server says.
const CLUSTER_SCHEME: &str = "redis+cluster://";

/// A connection commands are sent on: cheap to clone (multiplexed inside).
#[derive(Clone)]
pub enum Conn {
    /// One server, reconnecting with backoff.
    Manager(ConnectionManager),
    /// One server, a connection of its own (blocking moves).
    Plain(MultiplexedConnection),
    /// A Redis Cluster: each command to the master of its key's slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How further connections are made: for blocking moves and for pub/sub.
#[derive(Clone)]
pub struct Dial {
    /// The server the URL names (on a cluster: the node the slot map was learnt from).
    seed: redis::Client,
    cluster: Option<ClusterClient>,
    timeout: Duration,
}

impl Dial {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// A connection of its own for commands that block up to a second: its response
    /// timeout allows for the block.
    pub async fn blocking(&self) -> redis::RedisResult<Conn> {
        let response = self.timeout + Duration::from_secs(1);
        match &self.cluster {
            Some(c) => {
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(response);
                c.get_async_connection_with_config(cfg)
                    .await
                    .map(Conn::Cluster)
            }
            None => {
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(response));
                self.seed
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map(Conn::Plain)
            }
        }
    }

    /// A subscriber connection.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        self.seed.get_async_pubsub().await
    }
}

/// Why a URL cannot be used, in words for the start-up error.
pub type Refusal = String;

/// Connects to the server the URL names, as a cluster client when the URL or the server
/// says cluster. Fails at once when nothing answers.
pub async fn connect(
    url: &str,
    timeout: Duration,
) -> Result<(Conn, Dial), Result<redis::RedisError, Refusal>> {
    let (plain_url, forced) = match url.strip_prefix(CLUSTER_SCHEME) {
        Some(rest) => (format!("redis://{rest}"), true),
        None => (url.to_string(), false),
    };
    let seed = redis::Client::open(plain_url.as_str())
        .map_err(|e| Err(format!("bad --store URL: {e}")))?;
    let mut dial = Dial {
        seed: seed.clone(),
        cluster: None,
        timeout,
    };
    if !forced {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        let manager = match ConnectionManager::new_with_config(seed, config).await {
            Ok(m) => m,
            // A cluster node asked for another database while connecting.
            Err(e)
                if e.to_string()
                    .contains("SELECT is not allowed in cluster mode") =>
            {
                return Err(Err(NO_DB.into()))
            }
            Err(e) => return Err(Ok(e)),
        };
        if !says_cluster(&manager).await {
            return Ok((Conn::Manager(manager), dial));
        }
        tracing::info!("the redis server is a cluster node: connecting as a cluster client");
    }
    if seed_db(&dial.seed) != 0 {
        return Err(Err(NO_DB.into()));
    }
    let cluster = ClusterClient::builder([plain_url.as_str()])
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(2_000)
        .build()
        .map_err(|e| Err(format!("bad --store URL for a cluster: {e}")))?;
    let conn = cluster.get_async_connection().await.map_err(Ok)?;
    dial.cluster = Some(cluster);
    Ok((Conn::Cluster(conn), dial))
}

/// `INFO cluster` says `cluster_enabled:1`. A server that refuses `INFO` (renamed on
/// some managed services) is taken for a single server.
async fn says_cluster(manager: &ConnectionManager) -> bool {
    let info: redis::RedisResult<String> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut manager.clone())
        .await;
    match info {
        Ok(info) => cluster_enabled(&info),
        Err(e) => {
            tracing::debug!(error = %e, "INFO cluster failed; taking redis for a single server");
            false
        }
    }
}

fn cluster_enabled(info: &str) -> bool {
    info.lines().any(|l| l.trim() == "cluster_enabled:1")
}

fn seed_db(client: &redis::Client) -> i64 {
    client.get_connection_info().redis_settings().db()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_is_known_by_its_info_line() {
        assert!(cluster_enabled("# Cluster\r\ncluster_enabled:1\r\n"));
        assert!(!cluster_enabled("# Cluster\r\ncluster_enabled:0\r\n"));
        assert!(!cluster_enabled(""));
    }
}
