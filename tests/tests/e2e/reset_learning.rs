//! Learning test: what `CONSUMER.RESET` (nats-server 2.14, ADR-60) does to a pull consumer,
//! which a partition's source relies on to keep its inputs in order
//! (`Broker::consume_in_order`): it forgets what was pending, and numbers the deliveries
//! after it from consumer sequence 1, in stream order from the ack floor.

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use std::time::Duration;
use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_rewinds_to_the_ack_floor_and_numbers_deliveries_from_one() {
    let server = NatsServer::start();
    let client = connect_client(&server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "S".into(),
            subjects: vec!["s.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..10 {
        js.publish(format!("s.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("c".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .unwrap();
    let show = |label: &'static str, messages: Vec<jetstream::Message>| {
        for m in &messages {
            let info = m.info().unwrap();
            println!(
                "{label}: stream seq {} consumer seq {} delivered {}",
                info.stream_sequence, info.consumer_sequence, info.delivered
            );
        }
        messages
    };
    let fetch = |n: usize| {
        let consumer = consumer.clone();
        async move {
            let mut batch = consumer.fetch().max_messages(n).messages().await.unwrap();
            let mut out = Vec::new();
            while let Some(m) = batch.next().await {
                out.push(m.unwrap());
            }
            out
        }
    };
    let first = show("first", fetch(3).await);
    first[0].ack().await.unwrap();
    let second = show("second (another puller)", fetch(3).await);
    drop(second);
    let mut c = consumer.clone();
    let info = c.info().await.unwrap();
    println!(
        "before reset: delivered consumer {} stream {}, ack floor consumer {} stream {}, ack pending {}",
        info.delivered.consumer_sequence,
        info.delivered.stream_sequence,
        info.ack_floor.consumer_sequence,
        info.ack_floor.stream_sequence,
        info.num_ack_pending
    );
    assert_eq!(info.num_ack_pending, 5, "two pullers hold five");
    client
        .request("$JS.API.CONSUMER.RESET.S.c", "".into())
        .await
        .unwrap();
    let info = c.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0, "what was pending is forgotten");
    assert_eq!(info.delivered.consumer_sequence, 0);
    assert_eq!(info.ack_floor.stream_sequence, 1);
    let again = show("after reset", fetch(5).await);
    let sequences: Vec<(u64, u64)> = again
        .iter()
        .map(|m| {
            let info = m.info().unwrap();
            (info.stream_sequence, info.consumer_sequence)
        })
        .collect();
    assert_eq!(sequences, [(2, 1), (3, 2), (4, 3), (5, 4), (6, 5)]);
}
