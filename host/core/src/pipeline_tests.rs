//! The core's message path against the fakes: every crash window and fault of the issue
//! list, each in milliseconds, on tokio's paused clock (retries and keepalives advance it;
//! no test sleeps on a real one).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dead_letter::{DeadLetterHeaders, DeadLetterSchema};
use crate::fakes::{CrashProbe, FakePublisher, FakeRuntime, FakeSource, FakeStore, World};
use crate::headers::MSG_ID_HEADER;
use crate::input::DedupMode;
use crate::metrics::PipelineMetrics;
use crate::pipeline::{Fatal, Pipeline, Settings};
use crate::policy::OutputPolicy;
use crate::ports::{NoProbe, PluginRuntime, PluginSlot, Point, Probe};
use crate::record::{PLUGIN_CONTRACT, PLUGIN_SHA256};
use crate::state::{StateKeyRule, StateLimits, StateSettings};
use crate::status::PipelineStatus;

pub(crate) const BATCH: usize = 4;

pub(crate) fn pipeline<Pr: Probe>(
    world: &Arc<World>,
    store: Option<&Arc<FakeStore>>,
    runtime: &Arc<FakeRuntime>,
    probe: Pr,
    dedup: DedupMode,
) -> Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, Pr> {
    Pipeline {
        settings: Settings {
            name: "p".into(),
            dedup,
            input_stream: "IN".into(),
            consumer: "c".into(),
            ack_wait: Duration::from_secs(30),
            state: None,
        },
        store: store.cloned(),
        fence: None,
        publisher: FakePublisher {
            world: world.clone(),
        },
        runtime: Arc::new(PluginSlot::new(runtime.clone())),
        probe,
        policy: OutputPolicy {
            pipeline: "p".into(),
            prefix: "out".into(),
            max_outputs: 10,
            max_output_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
        },
        dead_letters: DeadLetterSchema {
            pipeline: "p".into(),
            dlq_subject: "dlq".into(),
            input_stream: "IN".into(),
            max_message_bytes: 1 << 20,
        },
        metrics: PipelineMetrics::default(),
        status: Arc::new(PipelineStatus::default()),
    }
}

/// The pipeline of most tests: a store, no probe, stream-sequence keys.
fn default_pipeline(
    world: &Arc<World>,
    store: &Arc<FakeStore>,
    runtime: &Arc<FakeRuntime>,
) -> Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, NoProbe> {
    pipeline(
        world,
        Some(store),
        runtime,
        NoProbe,
        DedupMode::StreamSequence,
    )
}

/// One "process" that runs until every input is acked, then stops cleanly.
async fn run_to_the_end(world: &Arc<World>, store: &Arc<FakeStore>, runtime: &Arc<FakeRuntime>) {
    let pipeline = default_pipeline(world, store, runtime);
    run_until_all_acked(&pipeline, world).await;
}

/// Runs `pipeline` until every input of `world` is acked, then stops it cleanly.
async fn run_until_all_acked<Pr: Probe>(
    pipeline: &Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, Pr>,
    world: &Arc<World>,
) {
    run_then_shut_down(pipeline, world, world.all_acked()).await;
}

/// Runs `pipeline` and shuts it down (as SIGTERM does) once `when` completes; it must then
/// stop cleanly.
async fn run_then_shut_down<Pr: Probe>(
    pipeline: &Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, Pr>,
    world: &Arc<World>,
    when: impl Future<Output = ()>,
) {
    let shutdown = CancellationToken::new();
    let run = pipeline.run(FakeSource::new(world, BATCH), shutdown.clone());
    let stop = async {
        when.await;
        shutdown.cancel();
    };
    let (result, ()) = tokio::join!(run, stop);
    result.expect("a clean stop");
}

/// One "process" running on a task of its own, which a test may abort (`kill -9`).
fn spawn_run(
    world: &Arc<World>,
    store: &Arc<FakeStore>,
    runtime: &Arc<FakeRuntime>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), Fatal>> {
    let pipeline = default_pipeline(world, store, runtime);
    let (world, shutdown) = (world.clone(), shutdown.clone());
    tokio::spawn(async move { pipeline.run(FakeSource::new(&world, BATCH), shutdown).await })
}

/// One "process" killed (its future dropped, no cleanup) the `nth` time it reaches `at`.
/// Returns whether it got there before running out of work.
async fn run_until_killed(
    world: &Arc<World>,
    store: &Arc<FakeStore>,
    runtime: &Arc<FakeRuntime>,
    at: Point,
    nth: usize,
) -> bool {
    let probe = CrashProbe::new(at, nth);
    let crashed = probe.crashed.clone();
    let pipeline = pipeline(
        world,
        Some(store),
        runtime,
        probe,
        DedupMode::StreamSequence,
    );
    let shutdown = CancellationToken::new();
    tokio::select! {
        result = pipeline.run(FakeSource::new(world, BATCH), shutdown.clone()) => {
            panic!("the pipeline stopped on its own: {result:?}")
        }
        () = crashed.notified() => true,
        () = world.all_acked() => false,
    }
}

/// One "process" that must stop on its own with a fatal error, as soon as it starts work.
async fn run_to_a_fatal_error(
    world: &Arc<World>,
    store: &Arc<FakeStore>,
    runtime: &Arc<FakeRuntime>,
) -> Fatal {
    let pipeline = default_pipeline(world, store, runtime);
    match pipeline
        .run(FakeSource::new(world, BATCH), CancellationToken::new())
        .await
    {
        Err(fatal) => fatal,
        Ok(()) => panic!("the pipeline stopped without an error"),
    }
}

/// The ids every payload must produce, each exactly once.
pub(crate) fn expected_ids(payloads: &[&str]) -> Vec<String> {
    let mut ids: Vec<String> = payloads
        .iter()
        .enumerate()
        .flat_map(|(index, payload)| {
            let key = format!("IN@1#{}", index + 1);
            match *payload {
                p if p.starts_with("bad") => vec![format!("p:{key}:dlq")],
                p if p.starts_with("two") => vec![format!("p:{key}:0"), format!("p:{key}:1")],
                _ => vec![format!("p:{key}:0")],
            }
        })
        .collect();
    ids.sort();
    ids
}

/// Every expected message stored exactly once, nothing else, every input acked.
pub(crate) fn assert_exactly_once(world: &World, payloads: &[&str]) {
    let mut stored: Vec<String> = world.stored().into_iter().map(|m| m.msg_id).collect();
    stored.sort();
    assert_eq!(stored, expected_ids(payloads), "each output exactly once");
    assert_eq!(world.acked(), payloads.len(), "every input acked");
}

pub(crate) const WORKLOAD: [&str; 10] = [
    "o-1", "two-2", "bad-3", "o-4", "o-5", "two-6", "o-7", "bad-8", "o-9", "o-10",
];

/// Every point of the message path, in path order: where the crash tests strike.
pub(crate) const EVERY_POINT: [Point; 5] = [
    Point::Fetched,
    Point::Executed,
    Point::Committed,
    Point::Published,
    Point::Acked,
];

#[tokio::test(start_paused = true)]
async fn without_faults_every_input_is_published_once() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    run_to_the_end(&world, &store, &runtime).await;
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), WORKLOAD.len());
    assert_eq!(
        store.outbox_len(),
        0,
        "the outbox is empty once all is acked"
    );
    let letters: Vec<_> = world
        .stored()
        .into_iter()
        .filter(|m| m.subject == "dlq")
        .collect();
    assert_eq!(
        DeadLetterHeaders::parse(&letters[0].headers).kind,
        "invalid-input"
    );
}

#[tokio::test(start_paused = true)]
async fn a_plugin_swapped_while_a_batch_is_in_hand_runs_from_the_next_batch() {
    let (world, store) = (World::new(), FakeStore::new());
    let old = Arc::new(FakeRuntime::named("old"));
    let new = Arc::new(FakeRuntime::named("new"));
    world.publish_inputs(&WORKLOAD);
    let slot = Arc::new(PluginSlot::new(old.clone()));
    // The reload comes as the first batch's calls start, and they find no instance free:
    // the retry must run on the plugin the batch started with.
    let (reload, next) = (slot.clone(), new.clone());
    *old.on_next_call.lock().expect("not poisoned") = Some(Box::new(move || {
        reload.replace(next);
    }));
    old.exhausted.store(1, Ordering::SeqCst);
    let mut swapped = pipeline(
        &world,
        Some(&store),
        &old,
        NoProbe,
        DedupMode::StreamSequence,
    );
    swapped.runtime = slot;
    run_until_all_acked(&swapped, &world).await;
    assert_exactly_once(&world, &WORKLOAD);
    // The plugins each input's outputs and dead letters name, by input.
    let mut plugins_of_input: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for message in world.stored() {
        let sequence = message
            .msg_id
            .split(['#', ':'])
            .nth(2)
            .expect("p:IN@1#<seq>:<n>");
        let sha256 = message
            .headers
            .iter()
            .find(|(name, _)| name == PLUGIN_SHA256)
            .map(|(_, value)| value.clone())
            .expect("every message names its plugin");
        let plugins = plugins_of_input
            .entry(sequence.parse().expect("a sequence"))
            .or_default();
        if !plugins.contains(&sha256) {
            plugins.push(sha256);
        }
    }
    let in_input_order: Vec<Vec<String>> = plugins_of_input.into_values().collect();
    let expected: Vec<Vec<String>> = (0..WORKLOAD.len())
        .map(|index| vec![if index < BATCH { "old" } else { "new" }.to_owned()])
        .collect();
    assert_eq!(
        in_input_order, expected,
        "the batch in hand when the swap came ran wholly on the old plugin, every later one on the new"
    );
    assert_eq!(old.calls.load(Ordering::SeqCst), BATCH);
    assert_eq!(new.calls.load(Ordering::SeqCst), WORKLOAD.len() - BATCH);
}

#[tokio::test(start_paused = true)]
async fn every_output_dead_letter_and_record_names_the_plugin_that_made_it() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    run_to_the_end(&world, &store, &runtime).await;
    let lineage = runtime.lineage();
    let stored = world.stored();
    assert!(stored.iter().any(|m| m.subject == "dlq") && stored.len() > WORKLOAD.len());
    for message in stored {
        let header = |name: &str| {
            message
                .headers
                .iter()
                .find(|(header, _)| header == name)
                .map(|(_, value)| value.clone())
        };
        assert_eq!(
            header(PLUGIN_SHA256),
            Some(lineage.sha256.clone()),
            "{message:?}"
        );
        assert_eq!(
            header(PLUGIN_CONTRACT),
            Some(lineage.contract.clone()),
            "{message:?}"
        );
    }
    let records = store.records();
    assert_eq!(records.len(), WORKLOAD.len());
    assert!(
        records
            .values()
            .all(|record| record.lineage.as_ref() == Some(&lineage))
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_each_point_then_a_restart_leaves_every_output_exactly_once() {
    for at in EVERY_POINT {
        for nth in [1, 2] {
            let (world, store, runtime) =
                (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
            world.publish_inputs(&WORKLOAD);
            assert!(
                run_until_killed(&world, &store, &runtime, at, nth).await,
                "the path reached {at:?} {nth} times"
            );
            run_to_the_end(&world, &store, &runtime).await;
            assert_exactly_once(&world, &WORKLOAD);
            // A committed input never runs again: inputs run once, plus those of the batch
            // in hand before its commit.
            let calls = runtime.calls.load(Ordering::SeqCst);
            let rerun = matches!(at, Point::Fetched | Point::Executed);
            assert!(
                calls == WORKLOAD.len() || (rerun && calls <= WORKLOAD.len() + BATCH),
                "{at:?} {nth}: {calls} calls"
            );
            if !rerun {
                assert_eq!(
                    calls,
                    WORKLOAD.len(),
                    "{at:?} {nth}: nothing committed runs again"
                );
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_input_committed_but_not_published_is_published_from_the_store() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD[..BATCH]);
    assert!(run_until_killed(&world, &store, &runtime, Point::Committed, 1).await);
    assert!(
        world.stored().is_empty(),
        "killed before anything was published"
    );
    run_to_the_end(&world, &store, &runtime).await;
    assert_exactly_once(&world, &WORKLOAD[..BATCH]);
    assert_eq!(
        runtime.calls.load(Ordering::SeqCst),
        BATCH,
        "the plugin ran once per input"
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_repeated_inside_a_batch_runs_once_and_publishes_once() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_input_with_headers("o-1", &[(MSG_ID_HEADER, "order-1")]);
    world.publish_input_with_headers("o-1", &[(MSG_ID_HEADER, "order-1")]);
    world.publish_inputs(&["o-3"]);
    let pipeline = pipeline(&world, Some(&store), &runtime, NoProbe, DedupMode::MsgId);
    run_until_all_acked(&pipeline, &world).await;
    let ids: Vec<String> = world.stored().into_iter().map(|m| m.msg_id).collect();
    assert_eq!(ids, ["p:msg-id:order-1:0", "p:IN@1#3:0"]);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), 2);
    assert_eq!(world.acked(), 3, "both copies are acked");
}

#[tokio::test(start_paused = true)]
async fn acks_that_fail_cost_a_redelivery_that_the_lookup_absorbs() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    world.fail_acks(3);
    // The first "process" acks all but three, then is stopped; the next one gets those
    // three again.
    let first = default_pipeline(&world, &store, &runtime);
    run_then_shut_down(&first, &world, world.acked_at_least(WORKLOAD.len() - 3)).await;
    run_to_the_end(&world, &store, &runtime).await;
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(runtime.calls.load(Ordering::SeqCst), WORKLOAD.len());
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_for_a_while_is_retried() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    store.fail_next(5);
    run_to_the_end(&world, &store, &runtime).await;
    assert_exactly_once(&world, &WORKLOAD);
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_store_stops_the_pipeline_with_nothing_acked() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    store.corrupt();
    let fatal = run_to_a_fatal_error(&world, &store, &runtime).await;
    assert!(matches!(fatal, Fatal::Store(_)), "{fatal:?}");
    assert_eq!(world.acked(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_store_call_that_panics_is_a_bug_that_stops_the_pipeline_not_a_retry() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    store.panic_next();
    match run_to_a_fatal_error(&world, &store, &runtime).await {
        Fatal::Store(error) => assert!(error.to_string().contains("panicked"), "{error}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(world.acked(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_plugin_call_that_panics_stops_the_pipeline_loudly_with_nothing_acked() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    runtime.panic_next.store(true, Ordering::SeqCst);
    match run_to_a_fatal_error(&world, &store, &runtime).await {
        Fatal::PluginCrashed(message) => assert!(message.contains("index out of bounds")),
        other => panic!("expected a plugin crash, got {other:?}"),
    }
    assert_eq!(world.acked(), 0);
    assert!(world.stored().is_empty());
    assert_eq!(store.commits(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_runtime_out_of_instances_is_retried_and_never_dead_letters() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    let valid = ["o-1", "o-2", "o-3"];
    world.publish_inputs(&valid);
    runtime.exhausted.store(4, Ordering::SeqCst);
    run_to_the_end(&world, &store, &runtime).await;
    assert_exactly_once(&world, &valid);
    assert!(world.stored().iter().all(|m| m.subject != "dlq"));
}

#[tokio::test(start_paused = true)]
async fn publishes_failing_for_a_while_ack_nothing_and_publish_nothing_twice() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD[..BATCH]);
    // Dead letters fail (their stream is gone); outputs go through.
    world.fail_subject(Some("dlq"));
    let shutdown = CancellationToken::new();
    let running = spawn_run(&world, &store, &runtime, &shutdown);
    // A minute of retries, with the duplicate window passing again and again.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        world.expire_duplicate_window();
    }
    assert_eq!(world.acked(), 0, "nothing of the held batch is acked");
    world.fail_subject(None);
    world.all_acked().await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_exactly_once(&world, &WORKLOAD[..BATCH]);
}

#[tokio::test(start_paused = true)]
async fn a_partly_published_input_killed_and_restarted_publishes_only_the_rest() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    let payloads = ["two-1"];
    world.publish_inputs(&payloads);
    world.fail_subject(Some("out.b"));
    let running = spawn_run(&world, &store, &runtime, &CancellationToken::new());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        world.stored().len(),
        1,
        "out.a is published, out.b keeps failing"
    );
    // kill -9 while retrying; then the window passes before the restart.
    running.abort();
    let _ = running.await;
    world.expire_duplicate_window();
    world.fail_subject(None);
    run_to_the_end(&world, &store, &runtime).await;
    assert_exactly_once(&world, &payloads);
}

/// A poison input of the stream's, whose header block cannot be read: it never reaches the
/// plugin, it is dead-lettered once with its block and acked, and the inputs around it go on.
#[tokio::test(start_paused = true)]
async fn an_input_with_an_unreadable_header_block_is_dead_lettered_without_the_plugin() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    let block = b"NATS/1.0\r\nX-Bad: \xff\r\n\r\n";
    world.publish_inputs(&["o-1"]);
    world.publish_unreadable_input("o-2", "header isn't valid utf-8", block);
    world.publish_inputs(&["o-3"]);
    run_to_the_end(&world, &store, &runtime).await;
    assert_eq!(
        runtime.calls.load(Ordering::SeqCst),
        2,
        "the plugin ran on the others only"
    );
    let stored = world.stored();
    let ids: Vec<&str> = stored.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids, ["p:IN@1#1:0", "p:IN@1#2:dlq", "p:IN@1#3:0"]);
    let letter = DeadLetterHeaders::parse(&stored[1].headers);
    assert_eq!(letter.kind, "unreadable-input");
    assert_eq!(
        letter.reason,
        "its header block cannot be read: header isn't valid utf-8"
    );
    assert_eq!(letter.input_header_block.as_deref(), Some(&block[..]));
    assert!(
        letter.input_headers.is_empty(),
        "{:?}",
        letter.input_headers
    );
}

/// The metrics count what happened: the plugin's calls (an unreadable input is none), and a
/// dead letter once the store has it, not when a commit that then fails was attempted.
#[tokio::test(start_paused = true)]
async fn metrics_count_plugin_calls_and_dead_letters_once_committed() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&["o-1", "bad-2"]);
    world.publish_unreadable_input(
        "o-3",
        "header isn't valid utf-8",
        b"NATS/1.0\r\n\xff\r\n\r\n",
    );
    store.fail_commits(1_000);
    let pipeline = default_pipeline(&world, &store, &runtime);
    run_then_shut_down(
        &pipeline,
        &world,
        tokio::time::sleep(Duration::from_secs(20)),
    )
    .await;
    assert_eq!(pipeline.metrics.dead_letters_by_kind(), []);
    assert_eq!(pipeline.metrics.executed.get(), 2);
    store.fail_commits(0);
    run_until_all_acked(&pipeline, &world).await;
    assert_eq!(
        pipeline.metrics.executed.get(),
        runtime.calls.load(Ordering::SeqCst) as u64
    );
    assert_eq!(
        pipeline.metrics.dead_letters_by_kind(),
        [("invalid-input", 1), ("unreadable-input", 1)]
    );
    assert_eq!(
        pipeline.metrics.handed_back.get(),
        3,
        "the stuck batch, once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_refused_for_good_becomes_a_dead_letter_and_the_batch_goes_on() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&["o-1", "big-2", "o-3"]);
    world.refuse_larger_than(500);
    run_to_the_end(&world, &store, &runtime).await;
    let stored = world.stored();
    let ids: Vec<&str> = stored.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids, ["p:IN@1#1:0", "p:IN@1#3:0", "p:IN@1#2:dlq"]);
    let letter = DeadLetterHeaders::parse(&stored[2].headers);
    assert_eq!(letter.kind, "output-rejected");
    assert_eq!(
        (letter.plugin_sha256, letter.plugin_contract),
        (runtime.lineage().sha256, runtime.lineage().contract)
    );
    assert!(
        letter.reason.contains("refused output 0 for good"),
        "{}",
        letter.reason
    );
    // The store says so too: a redelivery publishes the dead letter, not the output.
    let committed = crate::ports::DedupStore::lookup(&*store, &["IN@1#2"]).unwrap();
    let record = &committed[0].as_ref().unwrap().record;
    assert_eq!(record.disposition, crate::record::Disposition::DeadLettered);
    assert_eq!(record.lineage, Some(runtime.lineage()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_a_stage_retries_acks_nothing_of_that_batch() {
    // The store fails (lookup, then commit), or the publish does, when shutdown comes.
    type Setup = fn(&World, &FakeStore, &FakeRuntime);
    let stuck: [(&str, Setup); 5] = [
        ("lookup", |_, store, _| store.fail_next(1_000)),
        ("execute", |_, _, runtime| {
            runtime.exhausted.store(1_000, Ordering::SeqCst)
        }),
        ("commit", |_, store, _| store.fail_commits(1_000)),
        ("publish", |world, _, _| world.fail_publishes(1_000_000)),
        ("publish of dead letters", |world, _, _| {
            world.fail_subject(Some("dlq"))
        }),
    ];
    for (stage, setup) in stuck {
        let (world, store, runtime) =
            (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
        world.publish_inputs(&WORKLOAD[..BATCH]);
        setup(&world, &store, &runtime);
        let pipeline = default_pipeline(&world, &store, &runtime);
        // Shutdown comes while the stage is still retrying.
        run_then_shut_down(
            &pipeline,
            &world,
            tokio::time::sleep(Duration::from_secs(20)),
        )
        .await;
        assert_eq!(world.acked(), 0, "{stage}: nothing acked");
        // What was delivered is handed back at once, each input once, for the next owner
        // of the consumer. (A stuck lookup stops the outbox replay first: then nothing is.)
        let (unacked, handed_back) = world.unacked_and_handed_back();
        assert_eq!(handed_back, unacked, "{stage}: the stuck batch handed back");
        if stage != "lookup" {
            assert_eq!(handed_back.len(), BATCH, "{stage}: a whole batch delivered");
        }
        // Healed, a restart finishes the job.
        store.fail_next(0);
        store.fail_commits(0);
        runtime.exhausted.store(0, Ordering::SeqCst);
        world.fail_publishes(0);
        world.fail_subject(None);
        run_to_the_end(&world, &store, &runtime).await;
        assert_exactly_once(&world, &WORKLOAD[..BATCH]);
    }
}

#[tokio::test(start_paused = true)]
async fn at_least_once_keeps_no_store_and_relies_on_the_window() {
    let (world, runtime) = (World::new(), Arc::new(FakeRuntime::new()));
    world.publish_inputs(&WORKLOAD);
    let pipeline = pipeline(&world, None, &runtime, NoProbe, DedupMode::StreamSequence);
    run_until_all_acked(&pipeline, &world).await;
    assert_exactly_once(&world, &WORKLOAD);
    let by_subject: HashMap<String, usize> =
        world.stored().iter().fold(HashMap::new(), |mut counts, m| {
            *counts.entry(m.subject.clone()).or_default() += 1;
            counts
        });
    assert_eq!(by_subject["dlq"], 2);
}

/// A stateful pipeline: each input's state key is its `Account` header.
pub(crate) fn stateful<Pr: Probe>(
    mut pipeline: Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, Pr>,
) -> Pipeline<FakeStore, FakePublisher, Arc<FakeRuntime>, Pr> {
    pipeline.settings.state = Some(StateSettings {
        key: StateKeyRule::parse("header:Account").unwrap(),
        limits: StateLimits::default(),
    });
    pipeline
}

/// Transactions over three accounts, some of them overdrafts, as (account, amount).
pub(crate) fn transactions(count: usize) -> Vec<(String, i64)> {
    (0..count)
        .map(|i| {
            let account = format!("acct-{}", i * 7 % 3);
            let amount = [40, -25, 10, -60, 5, -5][i * 5 % 6];
            (account, amount)
        })
        .collect()
}

pub(crate) fn publish_transactions(world: &World, transactions: &[(String, i64)]) {
    for (account, amount) in transactions {
        world.publish_input_with_headers(&format!("{amount:+}"), &[("Account", account)]);
    }
}

/// What the workload alone says: per input, its message id and the balance it outputs (or
/// `None` for an overdraft's dead letter); and every account's final balance.
pub(crate) type Model = (Vec<(String, Option<String>)>, BTreeMap<String, i64>);

/// Each balance (and each overdraft's dead letter) in `stored` exactly once, with the
/// model's value.
pub(crate) fn assert_balances_once(
    stored: Vec<crate::record::OutboundMessage>,
    transactions: &[(String, i64)],
) {
    let (outputs, _) = model(transactions);
    let mut stored: Vec<(String, Option<String>)> = stored
        .into_iter()
        .map(|m| {
            let balance = (m.subject != "dlq").then(|| String::from_utf8(m.payload).unwrap());
            (m.msg_id, balance)
        })
        .collect();
    stored.sort();
    let mut expected = outputs;
    expected.sort();
    assert_eq!(
        stored, expected,
        "each balance exactly once, with the model's value"
    );
}

pub(crate) fn model(transactions: &[(String, i64)]) -> Model {
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    let outputs = transactions
        .iter()
        .enumerate()
        .map(|(index, (account, amount))| {
            let key = format!("IN@1#{}", index + 1);
            let balance = balances.entry(account.clone()).or_default();
            if *balance + amount < 0 {
                return (format!("p:{key}:dlq"), None);
            }
            *balance += amount;
            (format!("p:{key}:0"), Some(balance.to_string()))
        })
        .collect();
    (outputs, balances)
}

/// Every output exactly once with the model's balance at that point, every input acked,
/// and the store's state the model's.
fn assert_balances(world: &World, store: &FakeStore, transactions: &[(String, i64)]) {
    let (_, balances) = model(transactions);
    assert_balances_once(world.stored(), transactions);
    assert_eq!(world.acked(), transactions.len(), "every input acked");
    let state: BTreeMap<String, i64> = store
        .state()
        .into_iter()
        .map(|(account, entries)| {
            let balance = String::from_utf8(entries["balance"].clone()).unwrap();
            (account, balance.parse().unwrap())
        })
        .collect();
    assert_eq!(state, balances, "the committed state is the model's");
}

#[tokio::test(start_paused = true)]
async fn a_keys_inputs_see_the_state_the_ones_before_left_within_and_across_batches() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    let workload = transactions(30);
    publish_transactions(&world, &workload);
    let pipeline = stateful(default_pipeline(&world, &store, &runtime));
    run_until_all_acked(&pipeline, &world).await;
    assert_balances(&world, &store, &workload);
    let overdrafts = model(&workload)
        .0
        .iter()
        .filter(|(_, b)| b.is_none())
        .count();
    assert!(overdrafts > 0, "the workload has overdrafts");
    assert_eq!(runtime.calls.load(Ordering::SeqCst), workload.len());
}

#[tokio::test(start_paused = true)]
async fn with_state_a_crash_at_each_point_then_a_restart_leaves_state_and_outputs_consistent() {
    for at in EVERY_POINT {
        for nth in [1, 2, 3] {
            let (world, store, runtime) =
                (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
            let workload = transactions(24);
            publish_transactions(&world, &workload);
            let probe = CrashProbe::new(at, nth);
            let crashed = probe.crashed.clone();
            let killed = stateful(pipeline(
                &world,
                Some(&store),
                &runtime,
                probe,
                DedupMode::StreamSequence,
            ));
            tokio::select! {
                result = killed.run(FakeSource::new(&world, BATCH), CancellationToken::new()) => {
                    panic!("the pipeline stopped on its own: {result:?}")
                }
                () = crashed.notified() => {}
                () = world.all_acked() => panic!("{at:?} {nth}: never reached"),
            }
            drop(killed);
            let restarted = stateful(default_pipeline(&world, &store, &runtime));
            run_until_all_acked(&restarted, &world).await;
            assert_balances(&world, &store, &workload);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_lettered_input_changes_no_state_and_one_without_a_key_is_invalid() {
    let (world, store, runtime) = (World::new(), FakeStore::new(), Arc::new(FakeRuntime::new()));
    world.publish_input_with_headers("+10", &[("Account", "a")]);
    world.publish_input_with_headers("hoard", &[("Account", "a")]);
    world.publish_inputs(&["+5"]);
    world.publish_input_with_headers("-4", &[("Account", "a")]);
    let pipeline = stateful(default_pipeline(&world, &store, &runtime));
    run_until_all_acked(&pipeline, &world).await;
    let stored = world.stored();
    let kinds: Vec<(String, String)> = stored
        .iter()
        .map(|m| match m.subject.as_str() {
            "dlq" => ("dlq".into(), DeadLetterHeaders::parse(&m.headers).kind),
            _ => (
                m.subject.clone(),
                String::from_utf8(m.payload.to_vec()).unwrap(),
            ),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("out.balance.a".to_owned(), "10".to_owned()),
            ("dlq".into(), "state-limit".into()),
            ("dlq".into(), "invalid-input".into()),
            ("out.balance.a".into(), "6".into()),
        ]
    );
    assert_eq!(store.state()["a"].keys().collect::<Vec<_>>(), ["balance"]);
    assert_eq!(
        runtime.calls.load(Ordering::SeqCst),
        3,
        "the input without a key never ran"
    );
}
