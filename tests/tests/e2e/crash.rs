//! Exactly-once under `kill -9`: a weir process is killed at random moments while it works
//! and restarted each time; in the end every expected output is in the output stream exactly
//! once (by Nats-Msg-Id and by content), nothing is missing, and the DLQ holds exactly the
//! malformed inputs. The same holds when the network misbehaves instead: connections reset,
//! stalled, or silently dead (`FaultyProxy`).

use std::path::Path;
use std::time::{Duration, Instant};

use weir_tests::*;

const INPUTS: usize = 3000;
const MALFORMED_EVERY: usize = 50;
const KILLS: usize = 8;

fn start_weir(config: &Path, log: &Path) -> WeirProcess {
    spawn_weir(config, Some(log), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_exactly_once_across_repeated_sigkills() {
    let seed = seed_from_env("WEIR_CRASH_SEED");
    println!("crash test seed: {seed} (rerun with WEIR_CRASH_SEED={seed})");
    let mut rng = SeededRng(seed);

    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    let plugin = plugin("orders");
    let store_dir = dir.path().join("store");
    let config = PipelineToml {
        extra: "[pipeline.batch]\nmax_messages = 64\n",
        ..PipelineToml::orders(&server.url(), &plugin, &store_dir)
    }
    .write(dir.path(), "weir.toml");
    let log = dir.path().join("weir.log");

    let weir = start_weir(&config, &log);
    wait_for_stream(&js, "ORDERS").await;

    // Publish while weir is being killed and restarted.
    let payloads = order_workload(INPUTS, MALFORMED_EVERY);
    let publisher = publish_orders_spread(&js, &payloads, Duration::from_millis(60));
    let mut weir = sigkill_while_working(&js, "ORDERS_OUT", KILLS, &mut rng, weir, || {
        start_weir(&config, &log)
    })
    .await;
    publisher.await.unwrap();

    let started = Instant::now();
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(120)).await;
    println!("drained {:?} after the last restart", started.elapsed());

    // A clean stop: SIGTERM, exit 0.
    let status = terminate(&mut weir);
    assert!(status.success(), "SIGTERM stops weir cleanly, got {status}");

    verify_orders_exactly_once(&js, &payloads).await;
}

/// weir working through a `FaultyProxy` while 2 000 orders arrive in chunks.
struct ProxiedPipeline {
    _server: NatsServer,
    proxy: FaultyProxy,
    _dir: tempfile::TempDir,
    js: async_nats::jetstream::Context,
    weir: WeirProcess,
    payloads: Vec<Vec<u8>>,
    publisher: tokio::task::JoinHandle<()>,
}

impl ProxiedPipeline {
    /// Starts it; the producer sleeps `publish_pause` between chunks of 50.
    async fn start(publish_pause: Duration) -> ProxiedPipeline {
        let server = NatsServer::start();
        let proxy = FaultyProxy::start(server.port()).await;
        let dir = tempfile::tempdir().unwrap();
        let js = server.jetstream().await;
        let plugin = plugin("orders");
        let store_dir = dir.path().join("store");
        let proxy_url = proxy.url();
        let config = PipelineToml {
            extra: "[pipeline.batch]\nmax_messages = 64\n",
            ..PipelineToml::orders(&proxy_url, &plugin, &store_dir)
        }
        .write(dir.path(), "weir.toml");
        let weir = start_weir(&config, &dir.path().join("weir.log"));
        wait_for_stream(&js, "ORDERS").await;
        let payloads = order_workload(2000, 40);
        let publisher = publish_orders_spread(&js, &payloads, publish_pause);
        ProxiedPipeline {
            _server: server,
            proxy,
            _dir: dir,
            js,
            weir,
            payloads,
            publisher,
        }
    }

    /// Waits for every input, stops weir cleanly and runs the verifier. Every warning weir
    /// logged on the way (reconnections, retries) names its pipeline, through its span.
    async fn finish(mut self) {
        self.publisher.await.unwrap();
        wait_until_orders_processed(&self.js, &self.payloads, Duration::from_secs(120)).await;
        assert!(terminate(&mut self.weir).success());
        verify_orders_exactly_once(&self.js, &self.payloads).await;
        let log = std::fs::read_to_string(self._dir.path().join("weir.log")).unwrap();
        // weir's own lines (async-nats logs from its own tasks, outside weir's spans).
        let warnings: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(" WARN ") && line.contains("weir_"))
            .collect();
        assert!(!warnings.is_empty(), "the faults made weir warn");
        for line in warnings {
            assert!(line.contains("pipeline{pipeline=orders}"), "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_exactly_once_across_cut_connections() {
    let run = ProxiedPipeline::start(Duration::from_millis(40)).await;
    // Cut weir's connection to the server five times while it works.
    for cut in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        run.proxy.wait_for_a_live_connection().await;
        let connections = run.proxy.cut_connections();
        assert!(connections > 0, "cut {cut} dropped no connection");
    }
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_exactly_once_across_stalled_and_silent_connections() {
    let mut run = ProxiedPipeline::start(Duration::from_millis(60)).await;
    // Stalls longer than a pull request's heartbeat, then links that die without a reset:
    // weir must notice on its own, reconnect and go on.
    let started = Instant::now();
    // Inputs published while a link is silent, so that there is work to recover to however
    // fast weir drained the first 2 000 (order_workload is the same orders, extended).
    let extra = order_workload(run.payloads.len() + 100, 40);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        run.proxy.wait_for_a_live_connection().await;
        let stalled = run.proxy.stall(Duration::from_secs(3));
        assert!(stalled > 0, "the stall held no connection");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        run.proxy.wait_for_a_live_connection().await;
        let before = stream_len(&run.js, "ORDERS_OUT").await;
        let silenced = run.proxy.blackhole();
        assert!(silenced > 0, "the black hole took no connection");
        let published = run.payloads.len();
        let more = &extra[published..published + 50];
        publish_all(&run.js, "orders.in.new", more).await;
        run.payloads.extend_from_slice(more);
        wait_for(
            "weir to recover from a silent connection",
            Duration::from_secs(60),
            || async { stream_len(&run.js, "ORDERS_OUT").await > before },
        )
        .await;
        println!("recovered after {:?}", started.elapsed());
    }
    run.finish().await;
}
