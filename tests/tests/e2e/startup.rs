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

/// `weir <command> --config <config>`, run to its end without logs.
fn weir(command: &str, config: &Path) -> Output {
    Command::new(weir_binary())
        .args([command, "--config"])
        .arg(config)
        .env("RUST_LOG", "off")
        .output()
        .expect("run weir")
}

fn weir_run(config: &Path) -> Output {
    weir("run", config)
}

fn weir_check(config: &Path) -> Output {
    weir("check", config)
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

/// A pipeline with state and a plugin of contract 0.1.0, which cannot reach state: refused
/// before anything is consumed, saying which contract to build against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_with_a_0_1_0_plugin_is_refused_and_nothing_is_consumed() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    create_orders_stream(&js, None).await;
    publish_all(&js, "orders.in.x", &order_workload(5, 0)).await;

    let dir = tempfile::tempdir().unwrap();
    let state = "[pipeline.state]\nkey = \"subject-token:3\"\n";
    let config = write_config(dir.path(), &server.url(), &plugin("echo-v1"), state);
    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 2);
    assert!(
        message.contains("exports weir:transform/transformer@0.1.0, which keeps no state")
            && message.contains("wit/0.2.0"),
        "{message}"
    );
    // weir check says the same of the plugin.
    let checked = weir_check(&config);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{report}");
    assert!(report.contains("which keeps no state"), "{report}");
    let stream = js.get_stream("ORDERS").await.unwrap();
    assert!(
        stream.consumer_info("weir").await.is_err(),
        "no consumer was created"
    );
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

/// Each start-up error names the key to change and what to do: they once said only "No such
/// file or directory", "Not a directory", a line and column, "missing field `consumer`", or
/// "is nats-server running?" for a server that refused the credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_name_the_key_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let unreachable = format!("nats://127.0.0.1:{}", free_port());
    let orders = plugin("orders");
    let expect = |config: &Path, code: i32, wanted: &[&str]| {
        let (got, message) = failure(&weir_run(config));
        assert_eq!(got, code, "{message}");
        for part in wanted {
            assert!(message.contains(part), "{part:?} not in: {message}");
        }
    };
    let missing = dir.path().join("missing.wasm");
    let config = write_config(dir.path(), &unreachable, &missing, "");
    expect(
        &config,
        2,
        &[
            "missing.wasm",
            "set the pipeline's `plugin` to a component file",
        ],
    );
    let config = write_config(dir.path(), &unreachable, dir.path(), "");
    expect(
        &config,
        2,
        &[
            "Is a directory",
            "set the pipeline's `plugin` to a component file",
        ],
    );

    // A store_dir under a regular file: `weir run` and `weir check` both refuse it.
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    let text =
        std::fs::read_to_string(write_config(dir.path(), &unreachable, &orders, "")).unwrap();
    let store = format!("{:?}", dir.path().join("store").display().to_string());
    let under_file = format!(
        "{:?}",
        dir.path().join("a-file/store").display().to_string()
    );
    std::fs::write(&config, text.replace(&store, &under_file)).unwrap();
    expect(
        &config,
        1,
        &[
            "a-file/store",
            "set the pipeline's `store_dir` to a directory",
        ],
    );
    let checked = weir_check(&config);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{report}");
    assert!(
        report.contains("a-file is a file, not a directory"),
        "{report}"
    );

    // Values of the wrong type or range, and missing keys, by key and table.
    let with_fuel = write_config(
        dir.path(),
        &unreachable,
        &orders,
        "[pipeline.limits]\nfuel = -1\n",
    );
    expect(
        &with_fuel,
        2,
        &[
            "pipeline.limits.fuel (line ",
            "expected u64 (a whole number, 0 or more)",
        ],
    );
    std::fs::write(&config, text.replace("consumer = \"weir\"\n", "")).unwrap();
    expect(
        &config,
        2,
        &["pipeline.input (line ", "missing field `consumer`"],
    );

    // No server there: with the default log level, weir's error is the first line (the
    // retries are not logged), and it says how long weir tried.
    let text = std::fs::read_to_string(write_config(dir.path(), &unreachable, &orders, ""))
        .unwrap()
        .replace(
            &format!("url = \"{unreachable}\""),
            &format!("url = \"{unreachable}\"\nconnect_timeout_ms = 500"),
        );
    std::fs::write(&config, text).unwrap();
    let output = Command::new(weir_binary())
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("weir: pipeline \"orders\": cannot connect to NATS")
            && first.contains("pipeline.nats.connect_timeout_ms = 500"),
        "{stderr}"
    );

    // A server that refuses the credentials is reachable: the hint says so.
    let server =
        NatsServer::start_with_config(false, "authorization { user: weir, password: right }");
    let config = write_config(dir.path(), &server.url(), &orders, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("url = \"{}\"", server.url()),
        &format!(
            "url = \"{}\"\nuser = \"weir\"\npassword = \"wrong\"",
            server.url()
        ),
    );
    std::fs::write(&config, text).unwrap();
    expect(
        &config,
        1,
        &[
            "authorization violation",
            "refused weir's credentials: check pipeline.nats user and password",
        ],
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

/// `nats.url` as the README documents it for a cluster: several URLs separated by commas
/// (once refused as one invalid URL). With nothing listening at the first, weir connects
/// through another node, `weir check` passes, and the pipeline runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_cluster_urls_is_taken_and_a_dead_first_url_is_passed_over() {
    let cluster = NatsCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let urls = format!(
        "nats://127.0.0.1:{}, {}, {}",
        free_port(),
        cluster.url(1),
        cluster.url(2)
    );
    let config = write_config(dir.path(), &urls, &plugin("orders"), "");
    let checked = weir_check(&config);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{report}");

    let js = async_nats::jetstream::new(connect_client(&cluster.url(0)).await.unwrap());
    let mut weir = spawn_weir(&config, None, None);
    wait_for_stream(&js, "ORDERS").await;
    let payloads = order_workload(50, 0);
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    assert!(terminate(&mut weir).success());
    verify_orders_exactly_once(&js, &payloads).await;
}

/// A weir started while its input stream has no leader (for seconds after the node that led
/// it dies, until the others elect one) waits for the cluster within `connect_timeout_ms`:
/// it exited 1 ("cannot look up stream \"ORDERS\": … timed out").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weir_started_while_its_stream_has_no_leader_waits_for_one() {
    let mut cluster = NatsCluster::start().await;
    let js = async_nats::jetstream::new(connect_client(&cluster.url(0)).await.unwrap());
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.in.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let payloads = order_workload(50, 0);
    publish_all(&js, "orders.in.new", &payloads).await;
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .unwrap()
        .leader
        .unwrap();
    let leader: usize = leader.trim_start_matches('n').parse().unwrap();
    let live: Vec<usize> = (0..3).filter(|&node| node != leader).collect();
    cluster.kill(leader);

    let dir = tempfile::tempdir().unwrap();
    let urls = format!("{}, {}", cluster.url(live[0]), cluster.url(live[1]));
    let config = write_config(dir.path(), &urls, &plugin("orders"), "");
    let log = dir.path().join("weir.log");
    let mut weir = spawn_weir(&config, Some(&log), None);
    let js = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .connect(vec![cluster.url(live[0]), cluster.url(live[1])])
            .await
            .unwrap(),
    );
    let processed = tokio::time::timeout(
        Duration::from_secs(90),
        wait_until_orders_processed(&js, &payloads, Duration::from_secs(90)),
    )
    .await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        processed.is_ok(),
        "weir did not process the orders:\n{log_text}"
    );
    assert!(terminate(&mut weir).success(), "{log_text}");
    verify_orders_exactly_once(&js, &payloads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_in_use_is_refused_by_run_and_check_alike() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let config = write_config(dir.path(), &server.url(), &plugin("orders"), "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(ADMIN_OFF, &format!("[admin]\nlisten = \"{address}\"\n"));
    std::fs::write(&config, text).unwrap();

    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 1, "{message}");
    for part in [
        &format!("admin.listen = \"{address}\""),
        "set [admin] listen to a free address",
    ] {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
    let checked = weir_check(&config);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|line| line.contains("FAIL  admin port") && line.contains("set [admin] listen")),
        "{report}"
    );

    // Free again: both take it.
    drop(taken);
    let checked = weir_check(&config);
    let report = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(0), "{report}");
    assert!(
        report.contains(&format!("ok    admin port     {address} is free")),
        "{report}"
    );
}

/// A partitioned pipeline's output stream must hold its outputs, dead letters and progress
/// markers together and allow atomic publish: `weir run` refuses one that does not, saying
/// what to change, and `weir check` says the same, before anything is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_pipeline_refuses_an_output_stream_that_cannot_hold_its_commits() {
    use async_nats::jetstream::stream::Config;
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineToml {
        partitions: Some(1),
        ..PipelineToml::orders(&server.url(), &plugin("orders"), &dir.path().join("store"))
    }
    .write(dir.path(), "weir.toml");
    create_orders_stream(&js, None).await;
    publish_all(&js, "orders.in.new", &order_workload(5, 0)).await;
    let mut output = Config {
        name: "ORDERS_OUT".into(),
        subjects: vec!["orders.out.>".into(), "orders.dlq".into()],
        ..Default::default()
    };
    js.create_stream(output.clone()).await.unwrap();

    for (missing, advice) in [
        ("markers", "add \"_weir.progress.orders.>\" to its subjects"),
        ("atomic publish", "set allow_atomic_publish"),
    ] {
        let (code, message) = failure(&weir_run(&config));
        assert_eq!(code, 1, "{missing}: {message}");
        assert!(
            message.contains("cannot hold a partitioned pipeline's commits"),
            "{message}"
        );
        assert!(message.contains(advice), "{missing}: {message}");
        let report = weir_check(&config);
        let stdout = String::from_utf8_lossy(&report.stdout);
        assert!(
            !report.status.success() && stdout.contains(advice),
            "{stdout}"
        );
        output.subjects.push("_weir.progress.orders.>".into());
        output.subjects.dedup();
        js.update_stream(output.clone()).await.unwrap();
    }
    assert!(
        !drained(&js, "ORDERS", "weir").await,
        "nothing was consumed"
    );

    // Fixed, it runs, and the check says so.
    output.allow_atomic_publish = true;
    js.update_stream(output).await.unwrap();
    let report = weir_check(&config);
    let stdout = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success(), "{stdout}");
    assert!(stdout.contains("allows atomic publish"), "{stdout}");
}

/// A pipeline of several partitions needs its input stream to store each input under its
/// partition: one found without that transform (or with another number of partitions) is
/// refused, saying what to do, and nothing is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_refuse_an_input_stream_that_does_not_partition() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    let dir = tempfile::tempdir().unwrap();
    let text = PipelineToml {
        subject: "orders.in.*",
        partitions: Some(3),
        ..PipelineToml::orders(&server.url(), &plugin("orders"), &dir.path().join("store"))
    }
    .render()
    .replace(
        "partitions = 3",
        "partitions = 3\npartition_key = \"subject-token:3\"",
    );
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, ADMIN_OFF.to_owned() + &text).unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.in.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    publish_all(&js, "orders.in.c1", &order_workload(5, 0)).await;

    // `weir check` says so too, and names each partition's consumer.
    let output = weir_check(&config);
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    let failures: Vec<&str> = report.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(failures.len(), 1, "{report}");
    assert!(failures[0].contains("has no subject transform"), "{report}");
    for partition in 0..3 {
        let consumer = format!("\"weir-p{partition}\" does not exist yet");
        assert!(report.contains(&consumer), "{report}");
    }

    let (code, message) = failure(&weir_run(&config));
    assert_eq!(code, 1, "{message}");
    assert!(message.contains("has no subject transform"), "{message}");
    assert!(
        message.contains("{{partition(3,1)}}.orders.in.{{wildcard(1)}}"),
        "{message}"
    );
    assert!(
        message.contains("the number of partitions is fixed"),
        "{message}"
    );
    let stream = js.get_stream("ORDERS").await.unwrap();
    assert!(
        stream.consumer_info("weir-p0").await.is_err(),
        "no consumer was created"
    );
}
