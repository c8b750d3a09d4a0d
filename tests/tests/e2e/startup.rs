//! Start-up refuses what cannot work, with one line that says what to fix, a non-zero exit
//! code, and nothing consumed.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use weir_tests::*;

fn write_config(dir: &Path, url: &str, plugin: &Path, extra: &str) -> std::path::PathBuf {
    PipelineToml {
        extra,
        ..PipelineToml::orders(url, plugin, &dir.join("store"))
    }
    .write(dir, "weir.toml")
}

fn weir_run(config: &Path) -> Output {
    Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "off")
        .output()
        .expect("run weir")
}

/// The exit code and the one stderr line of a failed run.
fn failure(output: &Output) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line of error, got:\n{stderr}"
    );
    assert!(stderr.starts_with("weir: "), "{stderr}");
    (output.status.code().expect("exited, not killed"), stderr)
}

#[test]
fn config_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let unreachable = format!("nats://127.0.0.1:{}", free_port());
    let config = write_config(dir.path(), &unreachable, &plugin("orders"), "");
    let text = std::fs::read_to_string(&config).unwrap();

    std::fs::write(
        &config,
        text.replace("consumer = ", "consumr = 1\nconsumer = "),
    )
    .unwrap();
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(message.contains("unknown field `consumr`"), "{message}");

    std::fs::write(&config, text.replace("orders.wasm", "missing.wasm")).unwrap();
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(
        message.contains("cannot read plugin") && message.contains("missing.wasm"),
        "{message}"
    );

    let not_wasm = dir.path().join("not-wasm.wasm");
    std::fs::write(&not_wasm, "this is text").unwrap();
    let config = write_config(dir.path(), &unreachable, &not_wasm, "");
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(message.contains("is not a wasm component"), "{message}");

    let truncated = dir.path().join("truncated.wasm");
    let whole = std::fs::read(plugin("orders")).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let config = write_config(dir.path(), &unreachable, &truncated, "");
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(message.contains("is not a wasm component"), "{message}");

    let config = write_config(dir.path(), &unreachable, &plugin("sneaky-import"), "");
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(
        message.contains("imports `acme:sneaky/clock`")
            && message.contains("weir does not provide"),
        "{message}"
    );

    let config = write_config(dir.path(), &unreachable, &plugin("orders"), "");
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 1);
    assert!(message.contains("cannot connect to NATS"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_component_is_refused_and_nothing_is_consumed() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    create_orders_stream(&js, None).await;
    publish_all(&js, "orders.in.x", &order_workload(5, 0)).await;

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), &plugin("wrong-contract"), "");
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(
        message.contains("does not export weir:transform/transformer@0.1.0")
            && message.contains("weir:transform/transformer@0.0.1"),
        "{message}"
    );
    let stream = js.get_stream("ORDERS").await.unwrap();
    assert!(
        stream.consumer_info("weir").await.is_err(),
        "no consumer was created"
    );
    assert_eq!(stream_len(&js, "ORDERS").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_named_when_weir_may_not_create_it() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), &plugin("orders"), "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "ack_wait_ms = 2000",
            "ack_wait_ms = 2000\ncreate_stream = false",
        ),
    )
    .unwrap();
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 1);
    assert!(
        message.contains("input stream \"ORDERS\" does not exist")
            && message.contains("nats stream add"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_on_the_same_store_refuses_to_start() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), &plugin("orders"), "");
    let mut first = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .spawn()
        .unwrap();
    let js = server.jetstream().await;
    wait_for(
        "the first host to set up",
        Duration::from_secs(30),
        || async {
            match js.get_stream("ORDERS").await {
                Ok(stream) => stream.consumer_info("weir").await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 1);
    assert!(
        message.contains("is in use by another weir process"),
        "{message}"
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_consumer_with_another_filter_is_refused() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let stream = create_orders_stream(&js, None).await;
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("weir".into()),
            filter_subject: "orders.in.other".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), &plugin("orders"), "");
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 1);
    assert!(
        message.contains("consumer \"weir\" exists with filter \"orders.in.other\""),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_check_reports_every_problem_and_changes_nothing() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();

    // A configuration that would work: ready, and nothing created by the check.
    let good = write_config(dir.path(), &server.url(), &plugin("orders"), "");
    let output = Command::new(weir_binary())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("is ready to run"), "{report}");
    assert!(report.contains("weir will create it"), "{report}");
    assert!(
        js.get_stream("ORDERS").await.is_err(),
        "check created no stream"
    );
    assert!(!dir.path().join("store").exists(), "check created no store");

    // Four things wrong at once: all four reported, each with what to do.
    let bad = write_config(dir.path(), &server.url(), &plugin("wrong-contract"), "");
    let text = std::fs::read_to_string(&bad)
        .unwrap()
        .replace(
            "ack_wait_ms = 2000",
            "ack_wait_ms = 2000\ncreate_stream = false",
        )
        .replace("stream = \"ORDERS_OUT\"\n", "")
        .replace("consumer = \"weir\"", "consumer = \"we ir\"");
    std::fs::write(&bad, text).unwrap();
    let output = Command::new(weir_binary())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{report}\n{stderr}");
    let failures: Vec<&str> = report.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(failures.len(), 4, "{report}");
    assert!(report.contains("is not a consumer name"), "{report}");
    assert!(
        report.contains("does not export weir:transform/transformer@0.1.0"),
        "{report}"
    );
    assert!(
        report.contains("input stream \"ORDERS\" does not exist: create it"),
        "{report}"
    );
    assert!(
        report.contains("set output.stream to have weir create one"),
        "{report}"
    );
    assert!(stderr.contains("weir: 4 problems found"), "{stderr}");
}

/// The regression test for a chaos finding: a weir started while nats-server restarts used to
/// exit at once ("cannot connect"), and the pipeline stayed down until something restarted
/// weir. It now retries a refused first connection for `nats.connect_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_started_while_the_server_restarts_waits_for_it() {
    let FaultRig {
        mut server,
        js: _,
        dir: _dir,
        config,
        payloads,
    } = FaultRig::start(100).await;
    server.stop_with(libc::SIGTERM);
    let mut weir = spawn_weir(&config, None, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        weir.try_wait().unwrap().is_none(),
        "weir gave up on a server that was down for 2 s"
    );
    server.start_again();
    let js = server.jetstream().await;
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    assert!(terminate(&mut weir).success());
    verify_orders_exactly_once(&js, &payloads).await;
}
