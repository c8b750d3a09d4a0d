//! The chaos run at a size CI affords: host and server SIGKILLs at random moments, producer
//! retries past JetStream's duplicate window, malformed inputs; the independent verifier must
//! find every output exactly once.

use weir_tests::chaos::{self, ChaosPlan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_host_kills_server_restarts_and_producer_retries() {
    let seed = weir_tests::seed_from_env("WEIR_CHAOS_SEED");
    let report = chaos::run(ChaosPlan {
        messages: 2000,
        host_kills: 4,
        server_restarts: 2,
        seed,
    })
    .await;
    println!("{}", report.line());
    assert!(
        report.verdict.is_exact(),
        "{} (rerun with WEIR_CHAOS_SEED={seed})",
        report.line()
    );
}
