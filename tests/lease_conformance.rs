//! The lease conformance suite: the rules of `tally::cluster::lease`, written once and run
//! on the in-process leases and on a private Redis: one holder at a time, tokens that
//! only grow, a holder stalled past its lease refused (renewal, release and fenced
//! writes) once another holds the name, and a holder that stops trusting its lease
//! before it expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally::cluster::conn;
use tally::cluster::lease::{Claim, Grant, LeaseError, Leases, LocalLeases, RedisLeases};

#[path = "support/mod.rs"]
mod support;
use support::redis_server::RedisServer;

const TTL: Duration = Duration::from_millis(400);

async fn redis(server: &RedisServer) -> RedisLeases {
    let (c, dial) = conn::connect(&server.url(), Duration::from_secs(2))
        .await
        .unwrap_or_else(|_| panic!("connecting to the test's redis"));
    RedisLeases::new(c, dial)
}

fn granted(c: Claim) -> Grant {
    match c {
        Claim::Granted(g) => g,
        Claim::Refused(h) => panic!("refused, held by {h:?}"),
    }
}

/// Runs `case` on both implementations (a fresh Redis each time).
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() { super::$case(std::sync::Arc::new(tally::cluster::lease::LocalLeases::new())).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let server = super::RedisServer::start();
                super::$case(std::sync::Arc::new(super::redis(&server).await)).await
            })*
        }
    };
}

on_both!(
    two_contenders_never_both_hold,
    tokens_only_grow_from_one_grant_to_the_next,
    a_holder_stalled_past_its_lease_is_refused_everything_after_another_took_it,
    a_holder_stops_trusting_its_lease_before_it_expires,
    a_released_lease_is_free_at_once_and_a_stale_release_frees_nothing,
    bad_names_are_refused,
    a_follower_waiting_takes_a_released_lease_at_once,
    a_follower_waiting_takes_an_expired_lease,
);

async fn a_follower_waiting_takes_a_released_lease_at_once(leases: Arc<dyn Leases>) {
    // A long lease and a long wait: the follower has the lease within the test's
    // patience (20 s) only because the release was announced.
    let a = granted(
        leases
            .acquire("journal", "a", Duration::from_secs(60))
            .await
            .unwrap(),
    );
    let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel();
    let follower = {
        let leases = leases.clone();
        tokio::spawn(async move {
            let wait = leases.wait_free("journal", Duration::from_secs(60));
            let _ = waiting_tx.send(());
            wait.await.unwrap();
            leases
                .acquire("journal", "b", Duration::from_secs(60))
                .await
                .unwrap()
        })
    };
    waiting_rx.await.unwrap();
    // Most often the follower is listening by now (a release before it listens finds
    // the name free when it looks, which passes too).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(leases.release("journal", &a).await.unwrap());
    let b = tokio::time::timeout(Duration::from_secs(20), follower)
        .await
        .expect("the follower heard of the release");
    let b = granted(b.unwrap());
    assert!(b.token > a.token);
}

async fn a_follower_waiting_takes_an_expired_lease(leases: Arc<dyn Leases>) {
    let a = granted(leases.acquire("journal", "a", TTL).await.unwrap());
    // A stops renewing; the wait ends when the lease does.
    leases
        .wait_free("journal", Duration::from_secs(10))
        .await
        .unwrap();
    let b = granted(leases.acquire("journal", "b", TTL).await.unwrap());
    assert!(b.token > a.token);
    // Free already: no wait at all.
    assert!(leases.release("journal", &b).await.unwrap());
    leases
        .wait_free("journal", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(leases.holder("journal").await.unwrap(), None);
}

async fn two_contenders_never_both_hold(leases: Arc<dyn Leases>) {
    // Twenty contenders at once, five rounds: exactly one grant per round.
    for round in 0..5 {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let leases = leases.clone();
                tokio::spawn(async move {
                    leases
                        .acquire("journal", &format!("r{round}-{i}"), Duration::from_secs(30))
                        .await
                })
            })
            .collect();
        let mut grants = Vec::new();
        for t in tasks {
            if let Claim::Granted(g) = t.await.unwrap().unwrap() {
                grants.push(g);
            }
        }
        assert_eq!(grants.len(), 1, "round {round}: {grants:?}");
        let holder = leases.holder("journal").await.unwrap().unwrap();
        assert_eq!(
            (holder.holder.as_str(), holder.token),
            (grants[0].holder.as_str(), grants[0].token)
        );
        assert!(leases.release("journal", &grants[0]).await.unwrap());
    }
}

async fn tokens_only_grow_from_one_grant_to_the_next(leases: Arc<dyn Leases>) {
    let mut last = 0;
    for i in 0..10 {
        let g = granted(
            leases
                .acquire("journal", &format!("h{i}"), TTL)
                .await
                .unwrap(),
        );
        assert!(g.token > last, "token {} after {last}", g.token);
        last = g.token;
        // A renewal keeps the token; a new grant (after release) takes the next.
        let r = granted(leases.renew("journal", &g, TTL).await.unwrap());
        assert_eq!(r.token, g.token);
        assert!(leases.release("journal", &r).await.unwrap());
    }
    // Names have their own holders (and tokens, which grow name by name).
    let a = granted(leases.acquire("source:a", "x", TTL).await.unwrap());
    let b = granted(leases.acquire("source:b", "x", TTL).await.unwrap());
    assert!(leases.release("source:a", &a).await.unwrap());
    let again = granted(leases.acquire("source:a", "y", TTL).await.unwrap());
    assert!(again.token > a.token);
    assert!(leases.is_current("source:b", "x", b.token).await.unwrap());
}

async fn a_holder_stalled_past_its_lease_is_refused_everything_after_another_took_it(
    leases: Arc<dyn Leases>,
) {
    let old = granted(leases.acquire("journal", "a", TTL).await.unwrap());
    assert!(leases.is_current("journal", "a", old.token).await.unwrap());
    // A stalls (no renewal) past its lease; B takes the name.
    tokio::time::sleep(TTL + Duration::from_millis(150)).await;
    let new = granted(leases.acquire("journal", "b", TTL * 10).await.unwrap());
    assert!(new.token > old.token);
    // A wakes up: its renewal names the new holder, its fenced writes fail, its release
    // frees nothing.
    match leases.renew("journal", &old, TTL).await.unwrap() {
        Claim::Refused(Some(h)) => assert_eq!((h.holder.as_str(), h.token), ("b", new.token)),
        other => panic!("the stale renewal was answered {other:?}"),
    }
    assert!(!leases.is_current("journal", "a", old.token).await.unwrap());
    assert!(!leases.release("journal", &old).await.unwrap());
    assert!(leases.is_current("journal", "b", new.token).await.unwrap());
    // Another holder presenting B's token is refused too: the token is B's alone.
    assert!(!leases.is_current("journal", "a", new.token).await.unwrap());
}

async fn a_holder_stops_trusting_its_lease_before_it_expires(leases: Arc<dyn Leases>) {
    // A long lease, so that a loaded machine's late wake-ups stay inside the margin
    // between distrust (3 s) and expiry (4 s).
    const TTL: Duration = Duration::from_secs(4);
    let g = granted(leases.acquire("journal", "a", TTL).await.unwrap());
    assert!(g.trusted());
    let until = Instant::now() + TTL * 3;
    while g.trusted() {
        assert!(Instant::now() < until, "still trusted long after the lease");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Distrusted, yet still held: nobody else can have it yet.
    let h = leases.holder("journal").await.unwrap();
    assert!(
        h.as_ref().is_some_and(|h| h.holder == "a"),
        "the holder stopped trusting only after the lease ended: {h:?}"
    );
    assert!(matches!(
        leases.acquire("journal", "b", TTL).await.unwrap(),
        Claim::Refused(Some(_))
    ));
    // A renewal restores trust.
    let r = granted(leases.renew("journal", &g, TTL).await.unwrap());
    assert!(r.trusted());
}

async fn a_released_lease_is_free_at_once_and_a_stale_release_frees_nothing(
    leases: Arc<dyn Leases>,
) {
    let a = granted(
        leases
            .acquire("journal", "a", Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert!(leases.release("journal", &a).await.unwrap());
    assert_eq!(leases.holder("journal").await.unwrap(), None);
    let b = granted(
        leases
            .acquire("journal", "b", Duration::from_secs(30))
            .await
            .unwrap(),
    );
    assert!(
        !leases.release("journal", &a).await.unwrap(),
        "a's grant is gone"
    );
    assert_eq!(
        leases.holder("journal").await.unwrap().map(|h| h.holder),
        Some("b".to_string())
    );
    assert!(leases.release("journal", &b).await.unwrap());
}

async fn bad_names_are_refused(leases: Arc<dyn Leases>) {
    for name in ["", "has space", "{tally}:x"] {
        assert!(matches!(
            leases.acquire(name, "a", TTL).await,
            Err(LeaseError::BadName(_))
        ));
    }
    // A holder without a name, or a lease shorter than the store can keep, is refused
    // before anything is granted.
    for (holder, ttl) in [
        ("", TTL),
        (&*"h".repeat(129), TTL),
        ("a", Duration::from_micros(900)),
    ] {
        assert!(
            matches!(
                leases.acquire("journal", holder, ttl).await,
                Err(LeaseError::BadRequest(_))
            ),
            "{holder:?} {ttl:?}"
        );
    }
    assert_eq!(leases.holder("journal").await.unwrap(), None);
}

/// A Redis that forgot its data (restarted without persistence) starts the counter
/// above every token handed out before: a holder that stalled through the loss cannot
/// present a token a new holder has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_growing_after_redis_forgets() {
    let mut server = RedisServer::start();
    let leases = redis(&server).await;
    let mut old = 0;
    for i in 0..3 {
        let g = granted(
            leases
                .acquire("journal", &format!("h{i}"), TTL)
                .await
                .unwrap(),
        );
        leases.release("journal", &g).await.unwrap();
        old = g.token;
    }
    server.restart();
    let leases = redis(&server).await;
    let new = granted(leases.acquire("journal", "after", TTL).await.unwrap());
    assert!(new.token > old, "{} after {old}", new.token);
    // Redis back from an older snapshot: the counter behind tokens already handed out.
    leases.release("journal", &new).await.unwrap();
    let _: () = server.query(::redis::cmd("SET").arg("{tally}:fence:journal").arg(old));
    let newer = granted(leases.acquire("journal", "later", TTL).await.unwrap());
    assert!(
        newer.token > new.token,
        "{} after {}",
        newer.token,
        new.token
    );
}

/// The in-process counter starts at 1.
#[tokio::test]
async fn local_tokens_start_at_one() {
    let leases = LocalLeases::new();
    let g = granted(leases.acquire("journal", "a", TTL).await.unwrap());
    assert_eq!(g.token, 1);
}
