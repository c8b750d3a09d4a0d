//! What scale-out's fenced commit (issue 16) will rest on, checked on a real 3-node cluster
//! before anything is built on it: nats-server's atomic batch publish (ADR-50) with each
//! batch's progress marker chained on the previous one by `Nats-Expected-Last-Subject-
//! Sequence`. An owner that lost its partition (a paused "zombie") publishes a batch chained
//! on a stale marker: the whole batch must be refused, store nothing and register none of
//! its `Nats-Msg-Id`s, so that the new owner can publish the same outputs, with the same
//! ids, once. A batch abandoned before its commit (its host killed) must not hold the
//! marker's subject busy for the next owner. A commit unit holds at most 1 000 messages,
//! marker included: one more and the whole batch is refused. And a new owner that reads the
//! last marker right after the stream's leader changed reads the committed one.

use async_nats::HeaderMap;
use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
    NATS_MESSAGE_ID,
};
use async_nats::jetstream::{self, context::PublishErrorKind};
use weir_tests::*;

const MARKER: &str = "progress.p0";

/// A 3-node cluster with an output stream that also stores the progress markers, accepting
/// atomic batches; a client of it, and its JetStream context.
async fn cluster_with_output_stream() -> (NatsCluster, async_nats::Client, jetstream::Context) {
    let cluster = NatsCluster::start().await;
    let client = connect_client(&cluster.url(0)).await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["out.>".into(), "progress.>".into()],
        num_replicas: 3,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .expect("an R3 stream with atomic publish");
    (cluster, client, js)
}

fn staged(batch: &str, sequence: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_BATCH_ID, batch);
    headers.insert(NATS_BATCH_SEQUENCE, sequence.to_string().as_str());
    headers
}

/// Sends `outputs` (their `Nats-Msg-Id`s) as the staged messages of batch `batch`, without
/// its commit.
async fn stage(client: &async_nats::Client, batch: &str, outputs: &[&str]) {
    for (index, msg_id) in outputs.iter().enumerate() {
        let mut headers = staged(batch, index + 1);
        headers.insert(NATS_MESSAGE_ID, *msg_id);
        client
            .publish_with_headers(format!("out.{msg_id}"), headers, "output".into())
            .await
            .expect("a core publish");
    }
}

/// Publishes `outputs` and then the marker as one atomic batch, the marker expecting the
/// previous marker at `expected` (0: none yet). The marker's sequence, or the refusal.
async fn commit(
    client: &async_nats::Client,
    js: &jetstream::Context,
    batch: &str,
    outputs: &[&str],
    expected: u64,
) -> Result<u64, PublishErrorKind> {
    stage(client, batch, outputs).await;
    let mut headers = staged(batch, outputs.len() + 1);
    headers.insert(NATS_BATCH_COMMIT, "1");
    headers.insert(
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected.to_string().as_str(),
    );
    let ack = js
        .publish_with_headers(MARKER, headers, batch.to_owned().into())
        .await
        .map_err(|error| error.kind())?
        .await
        .map_err(|error| error.kind())?;
    assert_eq!(ack.batch_id.as_deref(), Some(batch));
    assert_eq!(ack.batch_size, Some(outputs.len() as u64 + 1));
    Ok(ack.sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_chained_on_a_stale_marker_stores_nothing_and_leaves_its_ids_free() {
    let (_cluster, client, js) = cluster_with_output_stream().await;

    let first = commit(&client, &js, "owner-1", &["in1-0", "in1-1", "in2-0"], 0)
        .await
        .expect("the first batch");
    assert_eq!(stream_len(&js, "OUT").await, 4);

    // A zombie, still chained on no marker at all, publishes the outputs of inputs 3 and 4.
    let zombie = commit(&client, &js, "zombie", &["in3-0", "in4-0"], 0).await;
    assert_eq!(zombie, Err(PublishErrorKind::WrongLastSequence));
    assert_eq!(stream_len(&js, "OUT").await, 4, "nothing of it is stored");

    // The owner publishes the same outputs, with the same ids: none of them is a duplicate.
    let second = commit(&client, &js, "owner-2", &["in3-0", "in4-0"], first)
        .await
        .expect("the owner's batch");
    assert_eq!(second, first + 3);
    let stored = read_stream(&js, "OUT").await;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "out.in1-0",
            "out.in1-1",
            "out.in2-0",
            MARKER,
            "out.in3-0",
            "out.in4-0",
            MARKER
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_abandoned_before_its_commit_does_not_hold_the_marker() {
    let (_cluster, client, js) = cluster_with_output_stream().await;
    let first = commit(&client, &js, "owner-1", &["in1-0"], 0)
        .await
        .expect("the first batch");

    // A host killed between its staged messages and its commit.
    stage(&client, "killed", &["in2-0", "in3-0"]).await;
    client.flush().await.unwrap();

    // The next owner commits on the last marker, with an id the abandoned batch staged:
    // the marker's subject is not held in flight (10164) and the id is not taken.
    let second = commit(&client, &js, "owner-2", &["in2-0"], first)
        .await
        .expect("the next owner's batch");
    assert_eq!(second, first + 2);
    let stored = read_stream(&js, "OUT").await;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["out.in1-0", MARKER, "out.in2-0", MARKER]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holds_a_thousand_messages_and_one_more_is_refused_whole() {
    let (_cluster, client, js) = cluster_with_output_stream().await;
    let ids = |batch: &str, count: usize| -> Vec<String> {
        (0..count).map(|index| format!("{batch}-{index}")).collect()
    };

    // 1 000 outputs and the marker: one past the server's default limit.
    let over = ids("over", 1000);
    let over: Vec<&str> = over.iter().map(String::as_str).collect();
    let refused = commit(&client, &js, "over", &over, 0).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(stream_len(&js, "OUT").await, 0, "nothing of it is stored");

    // 999 outputs and the marker: the most one commit unit may hold.
    let most = ids("most", 999);
    let most: Vec<&str> = most.iter().map(String::as_str).collect();
    let marker = commit(&client, &js, "most", &most, 0)
        .await
        .expect("a batch of 1 000");
    assert_eq!(marker, 1000);
    assert_eq!(stream_len(&js, "OUT").await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_marker_read_after_a_leader_change_is_the_committed_one() {
    let (_cluster, client, js) = cluster_with_output_stream().await;
    let committed = commit(&client, &js, "owner-1", &["in1-0"], 0)
        .await
        .expect("the first batch");
    let leader = || async {
        let mut stream = js.get_stream("OUT").await.ok()?;
        stream.info().await.ok()?.cluster.as_ref()?.leader.clone()
    };
    let before = leader().await.expect("the stream has a leader");

    // The leader steps down: a new owner taking over now reads the head from the new one.
    let response = client
        .request("$JS.API.STREAM.LEADER.STEPDOWN.OUT", "".into())
        .await
        .expect("the step-down is answered");
    assert!(
        !String::from_utf8_lossy(&response.payload).contains("\"error\""),
        "{:?}",
        response.payload
    );
    wait_for(
        "a new leader",
        std::time::Duration::from_secs(20),
        || async { leader().await.is_some_and(|now| now != before) },
    )
    .await;
    let stream = js.get_stream("OUT").await.unwrap();
    let head = stream
        .get_last_raw_message_by_subject(MARKER)
        .await
        .expect("the head is read from the new leader");
    assert_eq!(head.sequence, committed);
    assert_eq!(&head.payload[..], b"owner-1");
    // And the next commit chains on it.
    let next = commit(&client, &js, "owner-2", &["in2-0"], head.sequence)
        .await
        .expect("a commit after the leader change");
    assert_eq!(next, committed + 2);
}
