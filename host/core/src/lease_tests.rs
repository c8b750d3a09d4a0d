//! Two runs of a partitioned pipeline, one holding the partition's lease and one standing
//! by, against the fakes on tokio's paused clock: a holder that dies, stops cleanly, is cut
//! off while paused, or loses a write's answer; and the partition going to the host the
//! spread wants for it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fakes::{CrashProbe, FakeError, FakeLeases, FakeRuntime, FakeSource, PauseProbe, World};
use crate::fence_tests::{Fenced, fenced};
use crate::lease::{LeaseSettings, run_partition};
use crate::pipeline_tests::{BATCH, WORKLOAD, assert_exactly_once};
use crate::ports::{NoProbe, Point, Probe};
use crate::spread::{Members, assign};
use crate::status::Phase;

const TTL: Duration = Duration::from_secs(6);
const KEY: &str = "p.0";

fn lease(holder: &str) -> LeaseSettings {
    LeaseSettings {
        key: KEY.into(),
        holder: holder.into(),
        ttl: TTL,
        partition: 0,
        partitions: 1,
    }
}

/// A world with nothing published yet, a runtime and the leases.
fn fresh() -> (Arc<World>, Arc<FakeRuntime>, Arc<FakeLeases>) {
    (
        World::new(),
        Arc::new(FakeRuntime::new()),
        FakeLeases::new(),
    )
}

/// Runs `pipeline` as `holder` whenever it holds the lease, until `shutdown`, with no
/// members known: the lease goes to whoever takes it first.
async fn run<Pr: Probe>(
    pipeline: &Fenced<Pr>,
    world: &Arc<World>,
    leases: &FakeLeases,
    holder: &str,
    shutdown: &CancellationToken,
) {
    let (_, members) = Members::channel(holder);
    run_among(pipeline, world, leases, members, shutdown).await;
}

/// Runs `pipeline` as member `members.me()`, which is also its lease holder name.
async fn run_among<Pr: Probe>(
    pipeline: &Fenced<Pr>,
    world: &Arc<World>,
    leases: &FakeLeases,
    members: Members,
    shutdown: &CancellationToken,
) {
    let consume = || async { Ok::<_, FakeError>(FakeSource::new(world, BATCH)) };
    let lease = lease(members.me());
    run_partition(pipeline, leases, &lease, members, consume, shutdown.clone())
        .await
        .expect("no fatal error");
}

/// Two hosts' names, the first of which the spread wants for the one partition when both
/// are members.
fn wanted_and_other() -> (&'static str, &'static str) {
    match assign(1, &["a", "b"])[0] {
        Some("a") => ("a", "b"),
        _ => ("b", "a"),
    }
}

/// Waits until `key`'s lease is held by `holder`; panics after a few TTLs.
async fn held_by(leases: &FakeLeases, holder: &str) {
    let held = async {
        while leases.holder(KEY).as_deref() != Some(holder) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(TTL * 5, held)
        .await
        .unwrap_or_else(|_| panic!("{holder} never took the lease"));
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_within_a_ttl_of_the_holders_death() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    let probe = CrashProbe::new(Point::Committed, 2);
    let crashed = probe.crashed.clone();
    let a = fenced(&world, &runtime, probe, "a");
    let b = fenced(&world, &runtime, NoProbe, "b");
    let stop_b = CancellationToken::new();
    let b_run = run(&b, &world, &leases, "b", &stop_b);
    tokio::pin!(b_run);
    let never = CancellationToken::new();
    tokio::select! {
        biased;
        () = run(&a, &world, &leases, "a", &never) => panic!("a stopped"),
        () = &mut b_run => panic!("b stopped"),
        () = crashed.notified() => {}
    }
    assert_eq!(b.status.snapshot().phase, Phase::Standby, "b stood by");
    let died = Instant::now();
    let finish = async {
        world.all_acked().await;
        let took = died.elapsed();
        stop_b.cancel();
        took
    };
    let ((), took) = tokio::join!(b_run, finish);
    // a's lease lapses a TTL after its last renewal, at most a third of a TTL before it died.
    assert!(
        took >= TTL * 2 / 3 && took <= TTL + TTL / 5,
        "b finished {took:?} after a died"
    );
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(
        leases.holder(KEY),
        None,
        "b released the lease on its way out"
    );
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_stops_cleanly_hands_over_at_once() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    let a = fenced(&world, &runtime, NoProbe, "a");
    let b = fenced(&world, &runtime, NoProbe, "b");
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let handover = async {
        world.acked_at_least(BATCH).await;
        stop_a.cancel();
        // a drains and releases; b takes over within one look.
        let stopped = Instant::now();
        world.all_acked().await;
        let took = stopped.elapsed();
        stop_b.cancel();
        took
    };
    let ((), (), took) = tokio::join!(
        run(&a, &world, &leases, "a", &stop_a),
        run(&b, &world, &leases, "b", &stop_b),
        handover
    );
    assert!(took < TTL / 5, "b finished {took:?} after a stopped");
    assert_exactly_once(&world, &WORKLOAD);
}

#[tokio::test(start_paused = true)]
async fn a_holder_cut_off_while_paused_commits_nothing_after_a_standby_took_over() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    let probe = PauseProbe::new(Point::Executed, 2);
    let (paused, release) = (probe.paused.clone(), probe.release.clone());
    let a = fenced(&world, &runtime, probe, "a");
    let b = fenced(&world, &runtime, NoProbe, "b");
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let scenario = async {
        paused.notified().await;
        // a stalls with a batch executed, and cannot reach the server's leases: it stops
        // working on the partition a TTL after its last renewal, and b takes it over.
        leases.cut_off("a", true);
        world.all_acked().await;
        assert_eq!(leases.holder(KEY).as_deref(), Some("b"));
        // a wakes: its commit is refused, and it stands by.
        leases.cut_off("a", false);
        release.notify_one();
        loop {
            if a.status.snapshot().phase == Phase::Standby {
                break;
            }
            tokio::time::sleep(TTL / 10).await;
        }
        stop_a.cancel();
        stop_b.cancel();
    };
    tokio::join!(
        run(&a, &world, &leases, "a", &stop_a),
        run(&b, &world, &leases, "b", &stop_b),
        scenario
    );
    assert_exactly_once(&world, &WORKLOAD);
}

#[tokio::test(start_paused = true)]
async fn writes_whose_answers_are_lost_keep_the_lease() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    // The take's answer and the first renewal's are lost; both went through.
    leases.lose_write_answers(2);
    let a = fenced(&world, &runtime, NoProbe, "a");
    let b = fenced(&world, &runtime, NoProbe, "b");
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let watch = async {
        world.all_acked().await;
        // Several TTLs more: a keeps it all along.
        for _ in 0..9 {
            tokio::time::sleep(TTL / 3).await;
            assert_eq!(leases.holder(KEY).as_deref(), Some("a"));
            assert_eq!(b.status.snapshot().phase, Phase::Standby);
        }
        stop_a.cancel();
        stop_b.cancel();
    };
    tokio::join!(
        run(&a, &world, &leases, "a", &stop_a),
        run(&b, &world, &leases, "b", &stop_b),
        watch
    );
    assert_exactly_once(&world, &WORKLOAD);
    assert!(
        world.markers().iter().all(|marker| {
            let progress = crate::fence::Progress::parse(marker.sequence, &marker.payload);
            progress.unwrap().owner == "a#1"
        }),
        "only a ever committed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_cannot_renew_stops_working_when_its_lease_may_expire() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    let a = fenced(&world, &runtime, NoProbe, "a");
    let stop_a = CancellationToken::new();
    let scenario = async {
        world.all_acked().await;
        assert_eq!(a.status.snapshot().phase, Phase::Running);
        assert_eq!(a.metrics.lease_held.get(), 1);
        leases.cut_off("a", true);
        let cut = Instant::now();
        let stops = async {
            while a.status.snapshot().phase == Phase::Running {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(TTL * 2, stops)
            .await
            .expect("a stops working on the partition");
        let stopped = cut.elapsed();
        // Its last renewal was at most a third of a TTL before the cut; it stops when the
        // lease may expire (polled every 10 ms here).
        assert!(
            stopped >= TTL * 2 / 3 && stopped <= TTL + Duration::from_millis(20),
            "a stopped working {stopped:?} after it was cut off"
        );
        stop_a.cancel();
    };
    tokio::join!(run(&a, &world, &leases, "a", &stop_a), scenario);
    assert_exactly_once(&world, &WORKLOAD);
    assert_eq!(a.metrics.leases_lost.get(), 1);
    assert_eq!(a.metrics.lease_held.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_loses_its_lease_and_takes_it_again_goes_on_under_a_new_takeover() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD[..BATCH]);
    let a = fenced(&world, &runtime, NoProbe, "a");
    let stop_a = CancellationToken::new();
    let scenario = async {
        world.all_acked().await;
        // Cut off past its lease, a stops working on the partition; back, it takes the
        // lease and the partition again, and its markers are not taken for duplicates.
        leases.cut_off("a", true);
        while a.status.snapshot().phase == Phase::Running {
            tokio::time::sleep(TTL / 10).await;
        }
        leases.cut_off("a", false);
        world.publish_inputs(&WORKLOAD[BATCH..]);
        world.all_acked().await;
        stop_a.cancel();
    };
    tokio::join!(run(&a, &world, &leases, "a", &stop_a), scenario);
    assert_exactly_once(&world, &WORKLOAD);
    let owners: Vec<String> = world
        .markers()
        .iter()
        .map(|marker| {
            crate::fence::Progress::parse(marker.sequence, &marker.payload)
                .unwrap()
                .owner
        })
        .collect();
    assert_eq!(owners.first().map(String::as_str), Some("a#1"));
    assert_eq!(owners.last().map(String::as_str), Some("a#2"));
}

#[tokio::test(start_paused = true)]
async fn a_host_that_joins_is_handed_the_partition_wanted_for_it() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    let (joining, first) = wanted_and_other();
    let (first_sees, first_members) = Members::channel(first);
    let (joining_sees, joining_members) = Members::channel(joining);
    first_sees.send_replace([first.to_owned()].into());
    let a = fenced(&world, &runtime, NoProbe, first);
    let b = fenced(&world, &runtime, NoProbe, joining);
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let scenario = async {
        world.acked_at_least(BATCH).await;
        // The second host starts and registers; both see it.
        let both: std::collections::BTreeSet<String> = [first, joining].map(String::from).into();
        joining_sees.send_replace(both.clone());
        first_sees.send_replace(both);
        let joined = Instant::now();
        held_by(&leases, joining).await;
        let moved = joined.elapsed();
        world.all_acked().await;
        stop_a.cancel();
        stop_b.cancel();
        moved
    };
    let ((), (), moved) = tokio::join!(
        run_among(&a, &world, &leases, first_members, &stop_a),
        run_among(&b, &world, &leases, joining_members, &stop_b),
        scenario
    );
    // The holder waits out the grace, drains the batch in hand, and releases; the wanted
    // host takes the lease within one look.
    let grace = lease(first).grace();
    assert!(
        moved >= grace && moved <= grace + TTL / 10,
        "the partition moved {moved:?} after the host joined"
    );
    assert_exactly_once(&world, &WORKLOAD);
    let owners: Vec<String> = world
        .markers()
        .iter()
        .map(|marker| {
            crate::fence::Progress::parse(marker.sequence, &marker.payload)
                .unwrap()
                .owner
        })
        .collect();
    assert_eq!(owners.first(), Some(&format!("{first}#1")));
    assert_eq!(owners.last(), Some(&format!("{joining}#1")));
    // What the operator's metrics count: one take each, one handover.
    assert_eq!(a.metrics.handovers.get(), 1);
    assert_eq!(a.metrics.leases_taken.get(), 1);
    assert_eq!(a.metrics.lease_held.get(), 0);
    assert_eq!(b.metrics.leases_taken.get(), 1);
    assert_eq!(b.metrics.handovers.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_free_lease_waits_for_its_wanted_host_before_another_takes_it() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    // Both are members, but the wanted host never comes to take the partition (stuck, or
    // its pipeline not started): the other takes it after the grace.
    let (_, other) = wanted_and_other();
    let (sees, members) = Members::channel(other);
    sees.send_replace(["a", "b"].map(String::from).into());
    let a = fenced(&world, &runtime, NoProbe, other);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let scenario = async {
        held_by(&leases, other).await;
        let took = started.elapsed();
        world.all_acked().await;
        stop.cancel();
        took
    };
    let ((), took) = tokio::join!(run_among(&a, &world, &leases, members, &stop), scenario);
    let grace = lease(other).grace();
    assert!(
        took >= grace && took <= grace + TTL / 10,
        "took the free lease {took:?} after it started"
    );
    assert_exactly_once(&world, &WORKLOAD);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_does_not_see_itself_among_the_members_keeps_its_partition() {
    let (world, runtime, leases) = fresh();
    world.publish_inputs(&WORKLOAD);
    // Its own registration lapsed (it cannot write it): the members it sees say too little
    // to give the partition away on.
    let (joining, holder) = wanted_and_other();
    let (sees, members) = Members::channel(holder);
    let a = fenced(&world, &runtime, NoProbe, holder);
    let stop = CancellationToken::new();
    let scenario = async {
        world.all_acked().await;
        sees.send_replace([joining.to_owned()].into());
        for _ in 0..6 {
            tokio::time::sleep(TTL / 3).await;
            assert_eq!(leases.holder(KEY).as_deref(), Some(holder));
        }
        stop.cancel();
    };
    tokio::join!(run_among(&a, &world, &leases, members, &stop), scenario);
    assert_exactly_once(&world, &WORKLOAD);
}
