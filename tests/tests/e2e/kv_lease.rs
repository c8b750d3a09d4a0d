//! What scale-out's partition leases (issue 16) will rest on, checked on a real 3-node
//! cluster: a key of a KV bucket with per-message TTLs (`limit_markers`) as a lease. One host
//! creates it; no other can while it lives; its holder renews it by compare-and-set with a
//! fresh TTL (a raw publish: async-nats's `update` takes no TTL), which keeps it past its
//! first TTL; a renewal on a stale revision (a paused holder's) is refused; unrenewed, it
//! expires, and another host takes it on the expiry marker's revision.
//!
//! A pitfall seen in async-nats 0.51's source and avoided here: `create_with_ttl` on an
//! expired key falls back to `update` and drops the TTL, so a lease taken that way would
//! never expire. A host takes an expired lease with the raw publish instead.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation};
use async_nats::jetstream::{self, message::PublishMessage};
use weir_tests::*;

const TTL: Duration = Duration::from_secs(1);

/// Writes `holder` to the lease of partition 0, expecting its last revision to be
/// `revision` (0: no message at all), with a fresh TTL. The new revision, or the refusal.
async fn write_lease(
    js: &jetstream::Context,
    holder: &str,
    revision: u64,
) -> Result<u64, PublishErrorKind> {
    let publish = PublishMessage::build()
        .expected_last_subject_sequence(revision)
        .ttl(TTL)
        .payload(holder.to_owned().into());
    let ack = js
        .send_publish("$KV.leases.p0", publish)
        .await
        .map_err(|error| error.kind())?
        .await
        .map_err(|error| error.kind())?;
    Ok(ack.sequence)
}

/// The lease's holder and revision; no holder once it expired (the server's marker).
async fn lease(store: &kv::Store) -> (Option<String>, u64) {
    match store.entry("p0").await.expect("the lease is readable") {
        Some(entry) if entry.operation == Operation::Put => (
            Some(String::from_utf8(entry.value.to_vec()).unwrap()),
            entry.revision,
        ),
        Some(marker) => (None, marker.revision),
        None => (None, 0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_key_with_a_ttl_serves_as_a_lease_renewed_by_compare_and_set() {
    let cluster = NatsCluster::start().await;
    let js = jetstream::new(connect_client(&cluster.url(0)).await.unwrap());
    let store = js
        .create_key_value(kv::Config {
            bucket: "leases".into(),
            history: 1,
            num_replicas: 3,
            limit_markers: Some(TTL),
            ..Default::default()
        })
        .await
        .expect("a bucket with per-message TTLs");

    // Host a takes the lease; host b cannot while it lives.
    let mut revision = store
        .create_with_ttl("p0", "a".into(), TTL)
        .await
        .expect("a free lease is taken");
    let refused = store.create_with_ttl("p0", "b".into(), TTL).await;
    assert_eq!(
        refused.map_err(|error| error.kind()),
        Err(CreateErrorKind::AlreadyExists)
    );

    // a renews it every TTL/3, for three TTLs: it never lapses.
    let first = revision;
    for _ in 0..9 {
        tokio::time::sleep(TTL / 3).await;
        revision = write_lease(&js, "a", revision)
            .await
            .expect("the holder renews");
        // A read may come from a replica a moment behind (KV gets are direct): it catches up.
        wait_for("the renewal to be read", Duration::from_secs(5), || async {
            lease(&store).await == (Some("a".to_owned()), revision)
        })
        .await;
    }
    // A renewal on a stale revision (a holder paused past its lease) is refused.
    assert_eq!(
        write_lease(&js, "a", first).await,
        Err(PublishErrorKind::WrongLastSequence)
    );

    // Unrenewed, it expires: the server leaves a marker in its place.
    wait_for("the lease to expire", Duration::from_secs(10), || async {
        lease(&store).await.0.is_none()
    })
    .await;
    // Host b takes it on the marker's revision, with a TTL of its own, which also lapses.
    let (_, marker) = lease(&store).await;
    let taken = write_lease(&js, "b", marker)
        .await
        .expect("an expired lease is taken");
    // As for the renewals above: a replica a moment behind catches up.
    wait_for("b's take to be read", Duration::from_secs(5), || async {
        lease(&store).await == (Some("b".to_owned()), taken)
    })
    .await;
    wait_for("b's lease to expire", Duration::from_secs(10), || async {
        lease(&store).await.0.is_none()
    })
    .await;
}
