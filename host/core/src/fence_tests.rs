//! A partitioned pipeline's message path against the fakes: no store of its own, every
//! commit an atomic batch with its progress marker. Each "process" is a new owner with an
//! empty disk; the duplicate window passes between them, so that only the markers stand
//! between a restart and a duplicate.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::fakes::{
    CrashProbe, FakePublisher, FakeRuntime, FakeSource, FakeStore, PauseProbe, World,
};
use crate::fence::{Fence, FenceSettings, Progress};
use crate::input::DedupMode;
use crate::pipeline::{Fatal, Pipeline};
use crate::pipeline_tests::{
    BATCH, EVERY_POINT, WORKLOAD, assert_balances_once, assert_exactly_once, expected_ids, model,
    pipeline, publish_transactions, stateful, transactions,
};
use crate::ports::{NoProbe, Point, Probe};

const MARKERS: &str = "_weir.progress.p.0";

pub(crate) type Fenced<Pr> = Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, Pr>;

/// A partitioned pipeline run by `owner`, with no store.
pub(crate) fn fenced<Pr: Probe>(
    world: &Arc<World>,
    runtime: &Arc<FakeRuntime>,
    probe: Pr,
    owner: &str,
) -> Fenced<Pr> {
    let mut fenced = pipeline(world, None, runtime, probe, DedupMode::StreamSequence);
    fenced.fence = Some(Fence::new(FenceSettings {
        marker_subject: MARKERS.into(),
        owner: owner.into(),
        state_subjects: "_weir.progress.p.state".into(),
        max_state_bytes: 64 << 10,
    }));
    fenced
}

/// Runs `pipeline` until every input is acked, then stops it cleanly.
async fn run_to_the_end<Pr: Probe>(pipeline: &Fenced<Pr>, world: &Arc<World>) {
    let shutdown = CancellationToken::new();
    let run = pipeline.run(FakeSource::new(world, BATCH), shutdown.clone());
    let stop = async {
        world.all_acked().await;
        shutdown.cancel();
    };
    let (result, ()) = tokio::join!(run, stop);
    result.expect("a clean stop");
}

/// What the last marker says.
fn last_progress(world: &World) -> Progress {
    let marker = world.markers().pop().expect("a marker");
    Progress::parse(marker.sequence, &marker.payload).expect("a readable marker")
}

/// How many of the inputs 1..=`inputs` the last marker says are done.
fn done_count(world: &World, inputs: u64) -> u64 {
    let progress = last_progress(world);
    progress.floor.min(inputs) + progress.done_above.len() as u64
}

#[tokio::test(start_paused = true)]
async fn every_input_is_published_once_and_the_markers_chain_with_no_store() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    run_to_the_end(&fenced(&world, &runtime, NoProbe, "a/1"), &world).await;
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), WORKLOAD.len());
    let markers: Vec<Progress> = world
        .markers()
        .iter()
        .map(|marker| Progress::parse(marker.sequence, &marker.payload).unwrap())
        .collect();
    // The takeover marker first, then one commit per batch, numbered.
    assert_eq!(markers.len(), 1 + WORKLOAD.len().div_ceil(BATCH));
    for (commit, progress) in markers.iter().enumerate() {
        assert_eq!(
            (progress.owner.as_str(), progress.commit),
            ("a/1#1", commit as u64)
        );
    }
    assert_eq!(done_count(&world, WORKLOAD.len() as u64), 10);
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_each_point_then_a_new_owner_with_an_empty_disk_leaves_every_output_exactly_once()
 {
    for at in EVERY_POINT {
        for nth in [1, 2] {
            let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
            world.publish_inputs(&WORKLOAD);
            let probe = CrashProbe::new(at, nth);
            let crashed = probe.crashed.clone();
            let first = fenced(&world, &runtime, probe, "a/1");
            tokio::select! {
                result = first.run(FakeSource::new(&world, BATCH), CancellationToken::new()) => {
                    panic!("{at:?} {nth}: the pipeline stopped on its own: {result:?}")
                }
                () = crashed.notified() => {}
            }
            drop(first);
            let done = done_count(&world, WORKLOAD.len() as u64);
            let calls_before = runtime.calls.load(Ordering::SeqCst);
            world.expire_duplicate_window();
            run_to_the_end(&fenced(&world, &runtime, NoProbe, "b/1"), &world).await;
            assert_exactly_once(&world, &WORKLOAD);
            // The new owner runs exactly the inputs the last marker does not name.
            let calls_after = runtime.calls.load(Ordering::SeqCst) - calls_before;
            assert_eq!(
                calls_after as u64,
                WORKLOAD.len() as u64 - done,
                "{at:?} {nth}: {done} done at the crash"
            );
        }
    }
}

/// Every output exactly once with the model's balance at that point, and each account's
/// state, as its last state message on the output stream says, the model's.
fn assert_fenced_balances(world: &World, transactions: &[(String, i64)]) {
    let (_, balances) = model(transactions);
    const STATE: &str = "_weir.progress.p.state.";
    let (state_messages, stored): (Vec<_>, Vec<_>) = world
        .stored()
        .into_iter()
        .partition(|m| m.subject.starts_with(STATE));
    assert_balances_once(stored, transactions);
    let mut state = std::collections::BTreeMap::new();
    for message in state_messages {
        let key = crate::fence::state_key(STATE.trim_end_matches('.'), &message.subject);
        let entries = crate::state::KeyState::decode(&message.payload).unwrap();
        let balance = String::from_utf8(entries.entries()["balance"].clone()).unwrap();
        state.insert(
            key.expect("a state subject"),
            balance.parse::<i64>().unwrap(),
        );
    }
    assert_eq!(state, balances, "the committed state is the model's");
}

#[tokio::test(start_paused = true)]
async fn with_state_every_owner_runs_each_key_on_the_state_the_last_commit_left() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    let workload = transactions(30);
    publish_transactions(&world, &workload);
    run_to_the_end(&stateful(fenced(&world, &runtime, NoProbe, "a/1")), &world).await;
    assert_fenced_balances(&world, &workload);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), workload.len());
}

#[tokio::test(start_paused = true)]
async fn with_state_a_crash_at_each_point_then_a_new_owner_with_an_empty_disk_leaves_state_exact() {
    for at in EVERY_POINT {
        for nth in [1, 2, 3] {
            let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
            let workload = transactions(24);
            publish_transactions(&world, &workload);
            let probe = CrashProbe::new(at, nth);
            let crashed = probe.crashed.clone();
            let first = stateful(fenced(&world, &runtime, probe, "a/1"));
            tokio::select! {
                result = first.run(FakeSource::new(&world, BATCH), CancellationToken::new()) => {
                    panic!("{at:?} {nth}: the pipeline stopped on its own: {result:?}")
                }
                () = crashed.notified() => {}
            }
            drop(first);
            world.expire_duplicate_window();
            run_to_the_end(&stateful(fenced(&world, &runtime, NoProbe, "b/1")), &world).await;
            assert_fenced_balances(&world, &workload);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_state_too_large_for_its_message_is_a_state_limit_dead_letter() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    let workload = transactions(6);
    publish_transactions(&world, &workload);
    let mut pipeline = stateful(fenced(&world, &runtime, NoProbe, "a/1"));
    if let Some(fence) = &mut pipeline.fence {
        // No balance fits: every transaction is refused, none applies.
        fence.settings.max_state_bytes = 4;
    }
    run_to_the_end(&pipeline, &world).await;
    let stored = world.stored();
    assert_eq!(stored.len(), workload.len(), "a dead letter each, no state");
    // Deposits are refused for their state; withdrawals from a balance still 0, as
    // overdrafts.
    let kinds: Vec<String> = stored
        .iter()
        .map(|letter| crate::dead_letter::DeadLetterHeaders::parse(&letter.headers).kind)
        .collect();
    let deposits = workload.iter().filter(|(_, amount)| *amount > 0).count();
    let refused = kinds.iter().filter(|kind| *kind == "state-limit").count();
    assert_eq!(refused, deposits, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .all(|kind| kind == "state-limit" || kind == "invalid-input")
    );
}

#[tokio::test(start_paused = true)]
async fn an_owner_paused_past_a_takeover_publishes_and_acks_nothing_more() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    // The first owner stops with its second batch executed, not committed.
    let probe = PauseProbe::new(Point::Executed, 2);
    let (paused, release) = (probe.paused.clone(), probe.release.clone());
    let zombie = fenced(&world, &runtime, probe, "a/1");
    let zombie_run = zombie.run(FakeSource::new(&world, BATCH), CancellationToken::new());
    let takeover = async {
        paused.notified().await;
        let acked_by_zombie = world.acked();
        world.expire_duplicate_window();
        run_to_the_end(&fenced(&world, &runtime, NoProbe, "b/1"), &world).await;
        release.notify_one();
        acked_by_zombie
    };
    let (zombie_result, acked_by_zombie) = tokio::join!(zombie_run, takeover);
    match zombie_result {
        Err(Fatal::TakenOver(reason)) => assert!(reason.contains("b/1"), "{reason}"),
        other => panic!("the zombie must stop as taken over, got {other:?}"),
    }
    assert!(acked_by_zombie <= BATCH, "only its first batch");
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(last_progress(&world).owner, "b/1#1");
}

#[tokio::test(start_paused = true)]
async fn commits_whose_answers_are_lost_are_recognised_in_the_chain_not_sent_twice() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    // The takeover's answer and the first batch's are lost; both went through.
    world.lose_commit_answers(2);
    run_to_the_end(&fenced(&world, &runtime, NoProbe, "a/1"), &world).await;
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), WORKLOAD.len());
    assert_eq!(world.markers().len(), 1 + WORKLOAD.len().div_ceil(BATCH));
}

#[tokio::test(start_paused = true)]
async fn commits_failing_for_a_while_are_retried_and_ack_nothing_meanwhile() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    world.fail_publishes(5);
    run_to_the_end(&fenced(&world, &runtime, NoProbe, "a/1"), &world).await;
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), WORKLOAD.len());
}

#[tokio::test(start_paused = true)]
async fn an_input_whose_output_is_refused_for_good_is_dead_lettered_and_its_batch_goes_on() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    let workload = ["o-1", "big-2", "o-3", "two-4", "o-5"];
    world.publish_inputs(&workload);
    world.refuse_larger_than(500);
    let pipeline = fenced(&world, &runtime, NoProbe, "a/1");
    run_to_the_end(&pipeline, &world).await;
    // big-2's output becomes an output-rejected dead letter: the rest as if it were bad.
    assert_exactly_once(&world, &["o-1", "bad-2", "o-3", "two-4", "o-5"]);
    let letter = world
        .stored()
        .into_iter()
        .find(|message| message.subject == "dlq")
        .expect("a dead letter");
    let headers = crate::dead_letter::DeadLetterHeaders::parse(&letter.headers);
    assert_eq!(headers.kind, "output-rejected");
    assert!(headers.reason.contains("refused"), "{}", headers.reason);
    let snapshot = pipeline.metrics.snapshot();
    assert_eq!(snapshot.dead_lettered, 1, "{snapshot:?}");
}

#[tokio::test(start_paused = true)]
async fn an_output_stream_that_refuses_even_a_bare_dead_letter_is_retried_with_a_growing_backoff() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD[..1]);
    world.refuse_every_message();
    let pipeline = fenced(&world, &runtime, NoProbe, "a/1");
    let shutdown = CancellationToken::new();
    let run = pipeline.run(FakeSource::new(&world, BATCH), shutdown.clone());
    let watch = async {
        tokio::time::sleep(std::time::Duration::from_secs(20)).await;
        shutdown.cancel();
    };
    let (result, ()) = tokio::join!(run, watch);
    result.expect("a clean stop");
    // The retries' delays grow to a second: some 20 attempts in 20 s, not one every few
    // milliseconds.
    let attempts = world.commit_attempts();
    assert!(attempts < 60, "{attempts} commits tried in 20 s");
    assert!(world.stored().is_empty());
    assert_eq!(world.acked(), 0, "nothing acked while nothing is stored");
}

#[tokio::test(start_paused = true)]
async fn a_new_owner_resumes_from_the_floor_and_its_markers_stay_short() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    run_to_the_end(&fenced(&world, &runtime, NoProbe, "a/1"), &world).await;
    world.publish_inputs(&WORKLOAD);
    world.expire_duplicate_window();
    run_to_the_end(&fenced(&world, &runtime, NoProbe, "b/1"), &world).await;
    let progress = last_progress(&world);
    // The new owner read the consumer's ack floor before its first commit: everything the
    // first owner did is below it, and only its own inputs are named above.
    assert!(progress.floor >= 10, "{progress:?}");
    assert!(
        progress.done_above.iter().all(|&sequence| sequence > 10),
        "{progress:?}"
    );
    assert_eq!(runtime.calls.load(Ordering::SeqCst), 20);
    let mut stored: Vec<String> = world.stored().into_iter().map(|m| m.msg_id).collect();
    stored.sort();
    let mut twice = expected_ids(&[WORKLOAD, WORKLOAD].concat());
    twice.sort();
    assert_eq!(stored, twice);
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_marker_stops_the_pipeline_before_it_consumes() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    world.corrupt_marker(MARKERS);
    let pipeline = fenced(&world, &runtime, NoProbe, "a/1");
    match pipeline
        .run(FakeSource::new(&world, BATCH), CancellationToken::new())
        .await
    {
        Err(Fatal::Ledger(reason)) => assert!(reason.contains("sequence 1"), "{reason}"),
        other => panic!("expected a ledger error, got {other:?}"),
    }
    assert_eq!(world.acked(), 0);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), 0);
}
