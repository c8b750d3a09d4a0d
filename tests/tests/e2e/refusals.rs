//! Publishes that fail in part or for good: a batch never publishes again what JetStream
//! already acknowledged (after the output stream's duplicate window it would be stored
//! twice), and a message the server refuses for good becomes a dead letter instead of
//! holding its batch forever.

use std::time::Duration;

use async_nats::jetstream::stream;
use weir_tests::*;

/// The output and DLQ streams' duplicate window: short, so that the test outlives it.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);

async fn create_stream(js: &async_nats::jetstream::Context, name: &str, subject: &str) {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_outputs_are_not_published_again_while_the_rest_of_their_batch_retries() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    create_stream(&js, "IN", "in.>").await;
    create_stream(&js, "OUT", "out.>").await;
    // A full DLQ stream that discards new messages: dead letters fail (transiently, until
    // it has room), outputs do not.
    js.create_stream(stream::Config {
        name: "DLQ".into(),
        subjects: vec!["dlq".into()],
        duplicate_window: DUPLICATE_WINDOW,
        max_messages: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    publish_all(&js, "dlq", &[b"filler".to_vec()]).await;
    // Published before weir starts, so that its first batch holds them all.
    let inputs: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            if i % 2 == 0 {
                "fail".to_owned()
            } else {
                format!("echo-{i}")
            }
        })
        .map(String::into_bytes)
        .collect();
    publish_all(&js, "in.x", &inputs).await;
    let plugin = plugin("hostile");
    let store_dir = dir.path().join("store");
    let config = PipelineToml::plain("partial", &server.url(), &plugin, &store_dir)
        .write(dir.path(), "weir.toml");
    let weir = InProcessWeir::start(&config, &js, "IN").await;
    wait_for("the outputs", Duration::from_secs(30), || async {
        stream_len(&js, "OUT").await >= 5
    })
    .await;
    // The fault under test is time itself: the duplicate window passes, three times over,
    // while the batch's dead letters keep failing and are retried.
    tokio::time::sleep(DUPLICATE_WINDOW * 3).await;
    let consumer = js
        .get_stream("IN")
        .await
        .unwrap()
        .consumer_info("weir")
        .await
        .unwrap();
    assert_eq!(
        consumer.ack_floor.stream_sequence, 0,
        "nothing of the held batch is acked while its dead letters cannot be published"
    );

    let mut dlq = js
        .get_stream("DLQ")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    dlq.max_messages = -1;
    js.update_stream(dlq).await.unwrap();
    wait_until_drained(&js, "IN", "weir").await;
    weir.stop().await;
    let outputs: Vec<String> = read_stream(&js, "OUT")
        .await
        .into_iter()
        .map(|m| String::from_utf8(m.payload).unwrap())
        .collect();
    assert_eq!(
        outputs,
        ["echo-1", "echo-3", "echo-5", "echo-7", "echo-9"],
        "each output exactly once"
    );
    assert_eq!(
        stream_len(&js, "DLQ").await,
        1 + 5,
        "the filler and each dead letter exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_server_refuses_for_good_is_dead_lettered_instead_of_holding_its_batch() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = server.jetstream().await;
    create_stream(&js, "OUT", "out.>").await;
    create_stream(&js, "DLQ", "dlq").await;
    let plugin = plugin("hostile");
    let store_dir = dir.path().join("store");
    let config = PipelineToml::plain("refused", &server.url(), &plugin, &store_dir)
        .write(dir.path(), "weir.toml");
    let weir = InProcessWeir::start(&config, &js, "IN").await;

    // The output stream shrinks its largest message under a running weir: a larger output
    // is refused (error 10054) however often it is retried.
    let mut out = js
        .get_stream("OUT")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    out.max_message_size = 300;
    js.update_stream(out).await.unwrap();
    let large = "L".repeat(400);
    publish_all(
        &js,
        "in.x",
        &[
            b"small".to_vec(),
            large.clone().into_bytes(),
            b"tiny".to_vec(),
        ],
    )
    .await;
    wait_until_drained(&js, "IN", "weir").await;
    let stats = weir.stop_stats().await;

    let outputs: Vec<Vec<u8>> = read_stream(&js, "OUT")
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(outputs, [b"small".to_vec(), b"tiny".to_vec()]);
    let letters = read_stream(&js, "DLQ").await;
    assert_eq!(letters.len(), 1, "the refused input is dead-lettered once");
    let letter = &letters[0];
    assert_eq!(letter.header("Weir-Dlq-Kind"), Some("output-rejected"));
    let reason = letter.header("Weir-Dlq-Reason").unwrap();
    assert!(reason.contains("refused output 0 for good"), "{reason}");
    assert_eq!(
        letter.payload,
        large.as_bytes(),
        "the letter carries the input"
    );
    assert_eq!(stats.dead_lettered, 1, "{stats:?}");
    assert_eq!(stats.acked, 3, "{stats:?}");
}
