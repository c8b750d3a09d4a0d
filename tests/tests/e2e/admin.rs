//! The admin port of `weir run`, as an operator and Prometheus use it: `/metrics` parsed by a
//! real parser shows exactly what a known workload did, `/readyz` follows start-up and the
//! server's comings and goings, and the consumer's lag rises while weir is held and falls to
//! 0 after.

use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use weir_tests::*;

/// A configuration of the orders pipeline whose admin port listens on `admin`.
fn config_with_admin(dir: &Path, url: &str, admin: &str) -> std::path::PathBuf {
    let plugin = plugin("orders");
    let store = dir.join("store");
    let text = format!("[admin]\nlisten = \"{admin}\"\n")
        + &PipelineToml::orders(url, &plugin, &store).render();
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn free_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `GET path`; `None` while the port does not answer.
async fn get(admin: &str, path: &str) -> Option<(u16, String)> {
    weir_admin::fetch(admin, path).await.ok()
}

/// The value of the sample of `metric` whose labels include `labels`, if there is one.
fn sample(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == metric)
        .find(|sample| {
            labels
                .iter()
                .all(|(name, value)| sample.labels.get(name) == Some(value))
        })
        .map(|sample| match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric} is not a number: {other:?}"),
        })
}

async fn scrape(admin: &str) -> Scrape {
    let (code, text) = get(admin, "/metrics")
        .await
        .expect("the admin port answers");
    assert_eq!(code, 200, "{text}");
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("parse /metrics")
}

/// A weir that has processed 60 orders, one in six malformed: 50 valid ones with two
/// outputs each, 10 dead letters.
struct KnownWorkload {
    _server: NatsServer,
    js: async_nats::jetstream::Context,
    _dir: tempfile::TempDir,
    /// The admin port's address.
    admin: String,
    weir: WeirProcess,
}

impl KnownWorkload {
    async fn run() -> KnownWorkload {
        let server = NatsServer::start();
        let js = server.jetstream().await;
        let dir = tempfile::tempdir().unwrap();
        let admin = free_address();
        let config = config_with_admin(dir.path(), &server.url(), &admin);
        let payloads = order_workload(60, 6);
        create_orders_stream(&js, None).await;
        let weir = spawn_weir(&config, None, None);
        publish_all(&js, "orders.in.new", &payloads).await;
        wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
        KnownWorkload {
            _server: server,
            js,
            _dir: dir,
            admin,
            weir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_exactly_what_a_known_workload_did() {
    let KnownWorkload {
        _server,
        js: _,
        _dir,
        admin,
        mut weir,
    } = KnownWorkload::run().await;
    let orders = [("pipeline", "orders")];
    // Acks are counted as they complete, and the consumer's and store's figures are polled
    // every few seconds: wait for both to settle.
    let mut metrics = scrape(&admin).await;
    for _ in 0..300 {
        let settled = sample(&metrics, "weir_inputs_acked_total", &orders) == Some(60.0)
            && sample(&metrics, "weir_consumer_ack_pending_messages", &orders) == Some(0.0)
            && sample(&metrics, "weir_store_estimated_keys", &orders).is_some_and(|k| k > 0.0);
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = scrape(&admin).await;
    }
    let value = |metric: &str, labels: &[(&str, &str)]| {
        let mut all = orders.to_vec();
        all.extend_from_slice(labels);
        sample(&metrics, metric, &all).unwrap_or_else(|| panic!("no {metric} {all:?}"))
    };
    assert_eq!(value("weir_inputs_received_total", &[]), 60.0);
    assert_eq!(value("weir_inputs_executed_total", &[]), 60.0);
    assert_eq!(value("weir_inputs_deduplicated_total", &[]), 0.0);
    assert_eq!(
        value(
            "weir_inputs_dead_lettered_total",
            &[("kind", "invalid-input")]
        ),
        10.0
    );
    assert_eq!(value("weir_messages_published_total", &[]), 110.0);
    assert_eq!(value("weir_inputs_acked_total", &[]), 60.0);
    assert_eq!(value("weir_consumer_pending_messages", &[]), 0.0);
    assert!(value("weir_store_size_bytes", &[]) > 0.0);
    assert_eq!(value("weir_plugin_call_seconds_count", &[]), 60.0);
    assert_eq!(value("weir_plugin_fuel_count", &[]), 60.0);
    assert_eq!(value("weir_batch_inputs_sum", &[]), 60.0);
    assert_eq!(value("weir_end_to_end_seconds_count", &[]), 60.0);
    for stage in ["execute", "commit", "publish", "ack"] {
        assert!(
            value("weir_stage_seconds_count", &[("stage", stage)]) >= 1.0,
            "{stage}"
        );
    }
    let sha256 = weir_sandbox_sha256(&plugin("orders"));
    assert_eq!(
        value(
            "weir_plugin_info",
            &[
                ("sha256", &sha256),
                ("contract", "weir:transform/transformer@0.2.0")
            ]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "weir_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );

    let (code, body) = get(&admin, "/healthz").await.unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = get(&admin, "/readyz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(&admin, "/status").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let status: weir_admin::StatusReport = serde_json::from_str(&body).unwrap();
    let pipeline = &status.pipelines[0];
    assert_eq!(pipeline.phase, "running");
    assert_eq!(pipeline.acked, 60);
    assert_eq!(pipeline.dead_letters.get("invalid-input"), Some(&10));
    assert_eq!(pipeline.plugin.as_ref().unwrap().sha256, sha256);

    assert!(terminate(&mut weir).success());
}

/// The hex sha256 of a plugin file, as weir reports it.
fn weir_sandbox_sha256(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// `/readyz`'s code and the reason it gives for the pipeline, once the port answers.
async fn readiness(admin: &str) -> (u16, String) {
    let (code, body) = get(admin, "/readyz").await.unwrap_or((0, String::new()));
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let because = body["not_ready"][0]["because"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (code, because)
}

async fn wait_for_readiness(admin: &str, code: u16, because: &str) {
    let mut last = (0, String::new());
    for _ in 0..300 {
        last = readiness(admin).await;
        if last.0 == code && last.1.contains(because) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/readyz never said {code} {because:?}; last {last:?}");
}

/// A weir started while its server is down, once its admin port says it is waiting for the
/// server: the server, the weir, its admin address and its directory.
async fn weir_waiting_for_its_server() -> (NatsServer, WeirProcess, String, tempfile::TempDir) {
    let mut server = NatsServer::start();
    server.stop_with(libc::SIGKILL);
    let dir = tempfile::tempdir().unwrap();
    let admin = free_address();
    let config = config_with_admin(dir.path(), &server.url(), &admin);
    let weir = spawn_weir(&config, None, None);
    // Bound before anything starts: not ready while it waits for the server.
    wait_for_readiness(&admin, 503, "starting: connecting to NATS").await;
    (server, weir, admin, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_start_up_and_the_server() {
    let (mut server, mut weir, admin, _dir) = weir_waiting_for_its_server().await;
    server.start_again();
    wait_for_readiness(&admin, 200, "").await;
    // The server goes away: not ready until it is back.
    server.stop_with(libc::SIGKILL);
    wait_for_readiness(&admin, 503, "server gone").await;
    server.start_again();
    wait_for_readiness(&admin, 200, "").await;
    assert!(terminate(&mut weir).success());
}

/// A weir still starting (waiting for a server that is down) stops at once and cleanly on
/// SIGTERM, as an operator or a supervisor stopping it expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weir_waiting_for_its_server_stops_cleanly_on_sigterm() {
    let (_server, mut weir, _admin, _dir) = weir_waiting_for_its_server().await;
    send_signal(&weir, libc::SIGTERM);
    let status = wait_for_exit(&mut weir, Duration::from_secs(5)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_rises_while_weir_is_held_and_falls_to_zero_after() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_address();
    let config = config_with_admin(dir.path(), &server.url(), &admin);
    let first = order_workload(10, 0);
    create_orders_stream(&js, None).await;
    publish_all(&js, "orders.in.new", &first).await;
    let marker = dir.path().join("paused");
    let marker_text = marker.display().to_string();
    // Held for 12 s with its first batch committed, while more inputs arrive.
    let mut weir = spawn_weir_with_env(
        &config,
        None,
        &[
            ("WEIR_FAULT", "committed:1:pause"),
            ("WEIR_FAULT_PAUSE_MS", "12000"),
            ("WEIR_FAULT_MARKER", &marker_text),
        ],
    );
    wait_for("weir to pause", Duration::from_secs(60), || {
        std::future::ready(marker.exists())
    })
    .await;
    let more = order_workload(1000, 0);
    publish_all(&js, "orders.in.new", &more).await;
    let lag = async || {
        sample(
            &scrape(&admin).await,
            "weir_consumer_pending_messages",
            &[("pipeline", "orders")],
        )
        .unwrap_or(0.0)
    };
    // Polled every 5 s; weir is held for 12.
    let mut highest = 0.0;
    for _ in 0..100 {
        highest = f64::max(highest, lag().await);
        if highest > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(highest > 0.0, "the lag never rose while weir was held");
    let mut now = highest;
    for _ in 0..600 {
        now = lag().await;
        if now == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(now, 0.0, "the lag did not fall to 0");
    let all: Vec<Vec<u8>> = first.into_iter().chain(more).collect();
    wait_until_orders_processed(&js, &all, Duration::from_secs(60)).await;
    assert!(terminate(&mut weir).success());
    println!("lag while weir was held: {highest} inputs, then 0");
}

/// Headless Chromium: `WEIR_CHROMIUM`, else `chromium` or `chromium-browser` on PATH.
fn chromium() -> String {
    if let Ok(path) = std::env::var("WEIR_CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|output| output.status.success());
        if found {
            return name.to_owned();
        }
    }
    panic!(
        "the status page is tested in a real browser and there is no Chromium: install it (apt-get install chromium; scripts/test.sh does) or set WEIR_CHROMIUM to its path"
    );
}

/// Loads `url` in headless Chromium, `width` pixels wide, and returns what `flags` (such
/// as `--dump-dom`) print; the page's scripts get 5 s of virtual time to fetch and render.
fn browse(url: &str, width: u32, flags: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            &format!("--window-size={width},1400"),
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(flags)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start chromium");
    let output = {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("chromium did not finish loading {url} in 90 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    };
    assert!(
        output.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The text of the element whose `data-field` is `name`, in `html`.
fn field_text<'a>(html: &'a str, name: &str) -> &'a str {
    let marker = format!("data-field=\"{name}\"");
    let at = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in the page"));
    let start = at + html[at..].find('>').unwrap() + 1;
    let end = start + html[start..].find('<').unwrap();
    &html[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_known_workload_in_a_real_browser() {
    let KnownWorkload {
        _server,
        js,
        _dir,
        admin,
        mut weir,
    } = KnownWorkload::run().await;
    // The dead letters and the store's size are read every few seconds: wait until the
    // status has them, so that the page has them too.
    let mut report = None;
    for _ in 0..300 {
        let (_, body) = get(&admin, "/status")
            .await
            .expect("the admin port answers");
        let status: weir_admin::StatusReport = serde_json::from_str(&body).unwrap();
        let pipeline = &status.pipelines[0];
        if pipeline.acked == 60
            && pipeline.recent_dead_letters.len() == 5
            && pipeline.store_keys > 0
        {
            report = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = report.expect("the status never showed the whole workload");
    let url = format!("http://{admin}/");

    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || browse(&url, 1280, &["--dump-dom"])
    })
    .await
    .unwrap();
    // The rendered section of the pipeline (the page's template comes after it).
    let start = dom
        .find("data-pipeline=\"orders\"")
        .unwrap_or_else(|| panic!("the page rendered no pipeline: {dom}"));
    let end = start + dom[start..].find("<template").unwrap_or(dom.len() - start);
    let section = &dom[start..end];
    assert_eq!(field_text(section, "name"), "orders");
    assert_eq!(field_text(section, "phase"), "running, ready");
    assert_eq!(field_text(section, "acked"), "60");
    assert_eq!(field_text(section, "executed"), "60");
    assert_eq!(field_text(section, "deduplicated"), "0");
    assert_eq!(field_text(section, "published"), "110");
    assert_eq!(field_text(section, "dead_lettered"), "10");
    assert_eq!(field_text(section, "lag"), "0");
    assert!(
        section.contains(
            r#"<tr data-kind="invalid-input"><td>invalid-input</td><td class="num">10</td></tr>"#
        ),
        "dead letters by kind: {section}"
    );
    // The last five dead letters, newest first, as the DLQ stream holds them.
    let recent = &section[section.find("data-field=\"recent_dead_letters\"").unwrap()..];
    let recent = &recent[..recent.find("</tbody>").unwrap()];
    let dlq = read_stream(&js, "ORDERS_DLQ").await;
    assert_eq!(dlq.len(), 10);
    assert_eq!(recent.matches("<tr>").count(), 5, "{recent}");
    for (row, letter) in recent.split("<tr>").skip(1).zip(dlq.iter().rev()) {
        let sequence = letter.sequence;
        assert!(
            row.starts_with(&format!("<td class=\"num\">{sequence}</td>")),
            "expected DLQ sequence {sequence}: {row}"
        );
        assert!(row.contains("<td>invalid-input</td>"), "{row}");
        assert!(row.contains("<td>ORDERS#"), "{row}");
    }
    let plugin = report.pipelines[0].plugin.clone().unwrap();
    assert_eq!(field_text(section, "plugin_sha256"), plugin.sha256);
    assert_eq!(field_text(section, "plugin_contract"), plugin.contract);
    let store_size = field_text(section, "store_bytes");
    assert!(
        !store_size.is_empty() && store_size != "0 B",
        "store size {store_size:?}"
    );

    // Screenshots, wide and narrow, for a person to look at.
    let output_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&output_dir).unwrap();
    for (name, width) in [("status-page.png", 1280), ("status-page-narrow.png", 390)] {
        let path = output_dir.join(name);
        let _ = std::fs::remove_file(&path);
        let flag = format!("--screenshot={}", path.display());
        let url = url.clone();
        tokio::task::spawn_blocking(move || browse(&url, width, &[&flag]))
            .await
            .unwrap();
        let png = std::fs::read(&path).unwrap_or_else(|e| panic!("no screenshot {path:?}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{path:?} is not a PNG");
        println!("screenshot: {}", path.display());
    }
    assert!(terminate(&mut weir).success());
}
