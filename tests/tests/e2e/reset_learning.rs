//! Learning test (branch only): what CONSUMER.RESET does to a pull consumer's sequences.

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use std::time::Duration;
use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_reset_does_to_consumer_sequences() {
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
    let reply = client
        .request("$JS.API.CONSUMER.RESET.S.c", "".into())
        .await
        .unwrap();
    println!("reset: {}", String::from_utf8_lossy(&reply.payload));
    let info = c.info().await.unwrap();
    println!(
        "after reset: delivered consumer {} stream {}, ack floor consumer {} stream {}, ack pending {}",
        info.delivered.consumer_sequence,
        info.delivered.stream_sequence,
        info.ack_floor.consumer_sequence,
        info.ack_floor.stream_sequence,
        info.num_ack_pending
    );
    show("after reset", fetch(5).await);
}
