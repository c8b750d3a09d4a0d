//! `weir plugin diff`: a candidate run on a pipeline's recorded inputs and compared with
//! what the live plugin published. The live plugin itself compares the same on every
//! input; another plugin differs on exactly the inputs of the range, by the right kind;
//! inputs the live pipeline has not processed are not compared; nothing is published.

use std::time::Duration;

use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_is_compared_with_the_live_outputs_of_a_range_publishing_nothing() {
    let server = NatsServer::start();
    let js = server.jetstream().await;
    create_orders_stream(&js, None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = PipelineToml::orders(&server.url(), &plugin("orders"), &store)
        .write(dir.path(), "weir.toml");
    let mut weir = spawn_weir(&config, None, None);
    // 300 orders, every 10th malformed: 270 with two outputs each, 30 dead letters.
    let payloads = order_workload(300, 10);
    publish_all(&js, "orders.in.new", &payloads).await;
    wait_until_orders_processed(&js, &payloads, Duration::from_secs(60)).await;
    // The diff compares only inputs the live consumer has acked.
    wait_until_drained(&js, "ORDERS", "weir").await;
    let published = (
        stream_len(&js, "ORDERS_OUT").await,
        stream_len(&js, "ORDERS_DLQ").await,
    );
    assert_eq!(published, (540, 30));

    let same = plugin_diff(&config, &plugin("orders"), &["--last", "300"]);
    assert!(
        same.contains("sequences 1 to 300 of stream ORDERS, 300 inputs"),
        "{same}"
    );
    assert!(
        same.contains("compared 300: 300 same, 0 different\n"),
        "{same}"
    );
    assert!(!same.contains("differences:"), "{same}");

    let fixed = plugin_diff(
        &config,
        &plugin("hostile"),
        &["--from-seq", "101", "--to-seq", "200", "--show", "2"],
    );
    assert!(
        fixed.contains(
            "compared 100: 0 same, 100 different (90 outputs differ, 10 no longer dead-lettered)"
        ),
        "{fixed}"
    );
    assert!(fixed.contains("first 2 of 100 differences:"), "{fixed}");
    assert!(
        fixed.contains("input 101 (orders.in.new): outputs differ"),
        "{fixed}"
    );
    assert!(fixed.contains("[0] orders.out.echo"), "{fixed}");
    assert!(!fixed.contains("input 103 "), "only two are shown: {fixed}");

    // Inputs the live pipeline has not processed are not compared.
    assert!(terminate(&mut weir).success());
    publish_all(&js, "orders.in.new", &order_workload(20, 0)).await;
    let pending = plugin_diff(&config, &plugin("orders"), &["--last", "30"]);
    assert!(
        pending.contains(
            "compared 10: 10 same, 0 different; not compared: 20 not yet processed by the live pipeline"
        ),
        "{pending}"
    );
    assert_eq!(
        (
            stream_len(&js, "ORDERS_OUT").await,
            stream_len(&js, "ORDERS_DLQ").await
        ),
        published,
        "a diff publishes nothing"
    );
}
