//! Which live host should hold each partition of a pipeline: the same answer on every host
//! that sees the same members, spread evenly, and moving few partitions when a host joins or
//! leaves.
//!
//! Every host running a partitioned pipeline registers itself as a member (a key with a TTL,
//! kept by the adapter) and sees the others. From the members' names alone, each host works
//! out who is wanted for each partition. Each member scores each partition (rendezvous
//! hashing: a hash of both names); the pairs are taken from the highest score down, each
//! giving its partition to its member unless the partition has one already or the member is
//! full. Full means `⌈N/M⌉` partitions, or `⌊N/M⌋` once `N mod M` members have the larger
//! share, so every member ends with one or the other. A pair's score does not depend on the
//! other members, so when one joins or leaves mostly its own share moves.
//!
//! The wanted host is only a wish: the lease decides who works on a partition
//! ([`crate::lease`]), and the fence keeps exactly-once whoever does ([`crate::fence`]). Two
//! hosts that briefly see different members may both want a partition; one takes the lease
//! and the other stands by.

use std::collections::BTreeSet;

use tokio::sync::watch;

/// A pipeline's live members as this host sees them, and which of them it is. The adapter
/// keeps the set current ([`Members::channel`]); the core only reads it.
#[derive(Debug, Clone)]
pub struct Members {
    me: String,
    live: watch::Receiver<BTreeSet<String>>,
}

impl Members {
    /// This host as member `me`, and the sender the adapter updates the live members with.
    /// Until it first does, no member is known and no partition has a wanted host.
    pub fn channel(me: &str) -> (watch::Sender<BTreeSet<String>>, Members) {
        let (sender, live) = watch::channel(BTreeSet::new());
        (
            sender,
            Members {
                me: me.to_owned(),
                live,
            },
        )
    }

    /// This host's name among the members.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Whether this host is among the live members it sees (it has registered, and its
    /// registration has not lapsed).
    pub fn includes_me(&self) -> bool {
        self.live.borrow().contains(&self.me)
    }

    /// The member wanted for `partition` of `partitions`, now; `None` while no member is
    /// known.
    pub fn wanted(&self, partition: u32, partitions: u32) -> Option<String> {
        let live = self.live.borrow();
        let members: Vec<&str> = live.iter().map(String::as_str).collect();
        assign(partitions, &members)
            .get(partition as usize)
            .copied()
            .flatten()
            .map(str::to_owned)
    }

    /// Waits until the live members change (forever, once the adapter has stopped).
    pub async fn changed(&mut self) {
        if self.live.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The member wanted for each of `partitions` partitions, by index; every entry is `None`
/// when there are no members. `members` must be sorted and distinct (as a set's are).
pub fn assign<'m>(partitions: u32, members: &[&'m str]) -> Vec<Option<&'m str>> {
    let mut wanted = vec![None; partitions as usize];
    if members.is_empty() {
        return wanted;
    }
    let (share, extra) = (
        partitions as usize / members.len(),
        partitions as usize % members.len(),
    );
    let mut pairs: Vec<(u64, u32, usize)> = (0..partitions)
        .flat_map(|p| (0..members.len()).map(move |m| (score(members[m], p), p, m)))
        .collect();
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let mut load = vec![0; members.len()];
    let mut larger_shares = 0;
    for (_, partition, member) in pairs {
        let slot = &mut wanted[partition as usize];
        let has_room = load[member] < share || (load[member] == share && larger_shares < extra);
        if slot.is_some() || !has_room {
            continue;
        }
        if load[member] == share {
            larger_shares += 1;
        }
        load[member] += 1;
        *slot = Some(members[member]);
    }
    // Every partition has a member: a member stops taking only when full, and if one
    // partition were left, the members' loads would add up to more than the partitions.
    wanted
}

/// How much `member` wants `partition`: FNV-1a over both, the same on every host and every
/// build (std's hasher promises neither).
fn score(member: &str, partition: u32) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = member
        .bytes()
        .chain(partition.to_le_bytes())
        .fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        });
    // FNV's last bytes barely reach the high bits: mix them down (splitmix64's finaliser).
    let hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(assigned: &[Option<&str>], members: &[&str]) -> Vec<usize> {
        members
            .iter()
            .map(|m| assigned.iter().filter(|a| **a == Some(*m)).count())
            .collect()
    }

    #[test]
    fn six_partitions_on_three_hosts_are_two_each() {
        let members = ["a", "b", "c"];
        assert_eq!(counts(&assign(6, &members), &members), [2, 2, 2]);
    }

    #[test]
    fn no_members_want_nothing() {
        assert_eq!(assign(3, &[]), [None, None, None]);
    }

    proptest! {
        /// Every partition has a wanted member, and the shares differ by one at most.
        #[test]
        fn partitions_are_spread_evenly(
            partitions in 1u32..=64,
            members in proptest::collection::btree_set("[a-z0-9]{1,12}", 1..10),
        ) {
            let members: Vec<&str> = members.iter().map(String::as_str).collect();
            let assigned = assign(partitions, &members);
            prop_assert!(assigned.iter().all(Option::is_some));
            let counts = counts(&assigned, &members);
            let (least, most) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            prop_assert!(most - least <= 1, "{counts:?}");
        }

        /// A host that joins takes partitions mostly from the others' surplus: far fewer
        /// move than when every partition is dealt again.
        #[test]
        fn a_joining_host_moves_few_partitions(
            members in proptest::collection::btree_set("[a-z0-9]{1,12}", 2..6),
            joining in "[A-Z]{1,12}",
        ) {
            let partitions = 60;
            let before: Vec<&str> = members.iter().map(String::as_str).collect();
            let mut after = before.clone();
            after.push(&joining);
            after.sort_unstable();
            let (old, new) = (assign(partitions, &before), assign(partitions, &after));
            let moved = old.iter().zip(&new).filter(|(o, n)| o != n).count();
            // The joining host's share must move; allow as much again for the rebalancing.
            let share = partitions as usize / after.len() + 1;
            prop_assert!(moved <= 2 * share, "{moved} of {partitions} moved");
        }

        /// A host that leaves gives up its share, and the others keep nearly all of theirs.
        #[test]
        fn a_leaving_host_moves_little_more_than_its_own_partitions(
            members in proptest::collection::btree_set("[a-z0-9]{1,12}", 3..7),
            partitions in 6u32..=64,
            leaving in 0usize..7,
        ) {
            let before: Vec<&str> = members.iter().map(String::as_str).collect();
            let leaving = before[leaving % before.len()];
            let after: Vec<&str> = before.iter().copied().filter(|m| *m != leaving).collect();
            let (old, new) = (assign(partitions, &before), assign(partitions, &after));
            let others_moved = old
                .iter()
                .zip(&new)
                .filter(|(o, n)| **o != Some(leaving) && o != n)
                .count();
            let share = partitions as usize / after.len() + 1;
            prop_assert!(others_moved <= share, "{others_moved} of the others' moved");
        }
    }
}
