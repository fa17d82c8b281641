//! This replica's memory of folded hours, for the partial hours at the edges of counts.
//! A count over `[start, end)` reads its partial start hour (and an end hour with events
//! after the end) from the raw events: thousands of rows per call at 10M events, and
//! millions at high event rates. A dashboard repeats the same start hour for up to an
//! hour while its end slides; so the second time an hour is read raw, it is read once
//! more, whole, into an [`HourSummary`] kept here: each user's first and last second in
//! the hour (as a bitmap ordinal), and each event name's events per second. The users of
//! `[s, hour end)` are then those whose last second is at or after `s`, those of
//! `[hour start, e)` those whose first second is before `e`, and a name's events in any
//! part of the hour two lookups in its running totals.
//!
//! Never stale: a summary is used only by a count whose own snapshot shows the hour as it
//! was read ([`HourStamp`]): the same row of `event_totals_hourly` (every fold into an
//! hour bumps its `version`), no event-count deltas or pending users of the hour (an
//! insert or a deletion appends both in its own transaction, until a fold moves them and
//! bumps the version), and the same erasure generation (ordinals change only in an
//! erasure, and every erasure transaction bumps it). The check runs inside the count's
//! statement, which reads the hour raw instead when it fails: one round trip either way.
//!
//! Bounded: hours with more than [`MAX_SUMMARY_EVENTS`] events are not summarised (read
//! raw, as without this memory), and the kept summaries hold at most [`CAPACITY`] entries
//! (a user, or a name's second), 16 bytes each, the least recently useful hour evicted
//! first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use roaring::RoaringBitmap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::models::utc::HOUR_SECONDS;
use crate::models::PartialHour;

/// Hours with more events than this are never summarised: building a summary reads the
/// whole hour once (in the background, about 100 ms of PostgreSQL at this size).
pub(crate) const MAX_SUMMARY_EVENTS: i64 = 200_000;

/// Entries kept over all summarised hours: about 16 MB.
const CAPACITY: u64 = 1_000_000;

/// Raw reads of an hour after which its summary is built (a one-off count over a range
/// builds nothing; a repeated dashboard builds on its second call).
const RAW_READS_BEFORE_BUILDING: u8 = 2;

/// How long after its end an hour is first summarised: the open hour and the one just
/// closed take live traffic, so every fold would outdate their summaries.
const SETTLED_AFTER_SECONDS: i64 = HOUR_SECONDS;

/// Hours whose raw reads are counted at once; the counts start over beyond it.
const RAW_READ_TRACKING_LIMIT: usize = 4_096;

/// Summaries built at once by a replica. A build reads a whole hour in the background
/// (20-50 ms of PostgreSQL at 4,600 events an hour); run side by side, the builds a burst
/// of dashboards asks for would take the cores and the read pool's connections from the
/// counts being answered. One at a time leaves them the rest.
const CONCURRENT_BUILDS: usize = 1;

/// Builds waiting for their turn, the running ones included. Beyond it a build is dropped:
/// its hour goes on being read raw, and its next raw reads ask for it again.
const QUEUED_BUILDS: usize = 64;

/// What a summary was read from, checked by every count that uses it: the hour's row of
/// `event_totals_hourly` and the erasure generation, in a snapshot with no deltas or
/// pending users of the hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HourStamp {
    pub(crate) version: i64,
    pub(crate) events: i64,
    pub(crate) erasures: i64,
}

/// One event name's events in an hour: the seconds (into the hour) that hold any, in
/// order, and the running total of events up to and including each.
#[derive(Debug)]
struct NameSeconds {
    name: String,
    seconds: Vec<u16>,
    running_totals: Vec<i64>,
}

impl NameSeconds {
    /// Events before second `second` of the hour.
    fn before(&self, second: i64) -> i64 {
        match self.seconds.partition_point(|held| i64::from(*held) < second) {
            0 => 0,
            index => self.running_totals[index - 1],
        }
    }
}

/// One folded UTC hour: its identified users, each with the bitmap ordinal and the first
/// and last second (into the hour) of their events in it, and its events per name and
/// second.
#[derive(Debug)]
pub(crate) struct HourSummary {
    pub(crate) stamp: HourStamp,
    /// (second of the user's first event, ordinal), ordered by second.
    by_first: Vec<(u16, u32)>,
    /// (second of the user's last event, ordinal), ordered by second.
    by_last: Vec<(u16, u32)>,
    names: Vec<NameSeconds>,
}

impl HourSummary {
    /// A summary of `users` (ordinal, first second, last second into the hour) and
    /// `events` (name, second into the hour, events), in any order.
    pub(crate) fn new(
        stamp: HourStamp,
        users: impl IntoIterator<Item = (u32, u16, u16)>,
        events: impl IntoIterator<Item = (String, u16, i64)>,
    ) -> Self {
        let (mut by_first, mut by_last): (Vec<_>, Vec<_>) =
            users.into_iter().map(|(ordinal, first, last)| ((first, ordinal), (last, ordinal))).unzip();
        by_first.sort_unstable();
        by_last.sort_unstable();
        let mut events: Vec<(String, u16, i64)> = events.into_iter().collect();
        events.sort_unstable();
        let mut names: Vec<NameSeconds> = Vec::new();
        for (name, second, count) in events {
            match names.last_mut() {
                Some(last) if last.name == name => {
                    let total = last.running_totals.last().copied().unwrap_or_default() + count;
                    last.seconds.push(second);
                    last.running_totals.push(total);
                }
                _ => names.push(NameSeconds { name, seconds: vec![second], running_totals: vec![count] }),
            }
        }
        Self { stamp, by_first, by_last, names }
    }

    /// Whether the users of `part` can be told from first and last seconds: the part
    /// starts or ends with its hour.
    pub(crate) fn answers_users(part: &PartialHour) -> bool {
        let (hour_start, hour_end) = part.hour();
        part.start == hour_start || part.end == hour_end
    }

    /// The users with an event in `part` of this hour (see [`Self::answers_users`]).
    pub(crate) fn users_within(&self, part: &PartialHour) -> RoaringBitmap {
        let (hour_start, hour_end) = part.hour();
        let second = |instant: i64| (instant - hour_start) as u16;
        let chosen = if part.end == hour_end {
            let from = second(part.start);
            &self.by_last[self.by_last.partition_point(|(last, _)| *last < from)..]
        } else {
            let to = second(part.end);
            &self.by_first[..self.by_first.partition_point(|(first, _)| *first < to)]
        };
        let mut ordinals: Vec<u32> = chosen.iter().map(|(_, ordinal)| *ordinal).collect();
        ordinals.sort_unstable();
        RoaringBitmap::from_sorted_iter(ordinals).expect("sorted ordinals")
    }

    /// Events per name in `part` of this hour (only `name` when given), names without
    /// any left out.
    pub(crate) fn events_within(&self, part: &PartialHour, name: Option<&str>) -> Vec<(String, i64)> {
        let hour_start = part.hour().0;
        self.names
            .iter()
            .filter(|held| name.is_none_or(|name| held.name == name))
            .map(|held| {
                (held.name.clone(), held.before(part.end - hour_start) - held.before(part.start - hour_start))
            })
            .filter(|(_, count)| *count != 0)
            .collect()
    }

    fn entries(&self) -> usize {
        self.by_first.len() + self.names.iter().map(|held| held.seconds.len()).sum::<usize>()
    }
}

#[derive(Clone)]
struct EntriesWeighter;

impl Weighter<i64, Arc<HourSummary>> for EntriesWeighter {
    fn weight(&self, _hour: &i64, summary: &Arc<HourSummary>) -> u64 {
        summary.entries().max(1) as u64
    }
}

/// The summarised hours (by hour start, Unix seconds); cheap to clone (one shared
/// memory per replica).
#[derive(Clone)]
pub struct EdgeHourMemory {
    summaries: Arc<Cache<i64, Arc<HourSummary>, EntriesWeighter>>,
    /// Raw reads of each hour since its last build.
    raw_reads: Arc<Mutex<HashMap<i64, u8>>>,
    /// Turns to build ([`CONCURRENT_BUILDS`]) and places in the queue ([`QUEUED_BUILDS`]).
    build_turns: Arc<Semaphore>,
    build_places: Arc<Semaphore>,
}

/// A build's place in the queue (see [`EdgeHourMemory::queue_build`]).
pub(crate) struct QueuedBuild {
    place: OwnedSemaphorePermit,
    turns: Arc<Semaphore>,
}

impl QueuedBuild {
    /// Waits for a turn to build; the build runs while the returned guard lives.
    pub(crate) async fn turn(self) -> BuildTurn {
        let turn = self.turns.acquire_owned().await.expect("the build turns are never closed");
        BuildTurn { _turn: turn, _place: self.place }
    }
}

/// A turn to build, held while the build runs.
pub(crate) struct BuildTurn {
    _turn: OwnedSemaphorePermit,
    _place: OwnedSemaphorePermit,
}

impl Default for EdgeHourMemory {
    fn default() -> Self {
        Self {
            summaries: Arc::new(Cache::with_weighter(1_024, CAPACITY, EntriesWeighter)),
            raw_reads: Arc::default(),
            build_turns: Arc::new(Semaphore::new(CONCURRENT_BUILDS)),
            build_places: Arc::new(Semaphore::new(QUEUED_BUILDS)),
        }
    }
}

impl std::fmt::Debug for EdgeHourMemory {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EdgeHourMemory").field("hours", &self.summaries.len()).finish()
    }
}

impl EdgeHourMemory {
    /// The summary of the hour starting at `hour_start`, if one is kept.
    pub(crate) fn get(&self, hour_start: i64) -> Option<Arc<HourSummary>> {
        self.summaries.get(&hour_start)
    }

    /// How many hours have a kept summary.
    pub fn summarised_hours(&self) -> usize {
        self.summaries.len()
    }

    /// Keeps the summary of the hour starting at `hour_start`.
    pub(crate) fn keep(&self, hour_start: i64, summary: HourSummary) {
        debug_assert_eq!(hour_start % HOUR_SECONDS, 0);
        self.summaries.insert(hour_start, Arc::new(summary));
    }

    /// Notes that a count read the hour starting at `hour_start` raw at `now`; true when
    /// its summary should be built now: once per [`RAW_READS_BEFORE_BUILDING`] raw reads
    /// (so concurrent counts build it once), and only for an hour that ended
    /// [`SETTLED_AFTER_SECONDS`] ago.
    pub(crate) fn note_raw_read(&self, hour_start: i64, now: i64) -> bool {
        if hour_start + HOUR_SECONDS + SETTLED_AFTER_SECONDS > now {
            return false;
        }
        let mut raw_reads = self.raw_reads.lock().expect("raw read counts");
        if raw_reads.len() >= RAW_READ_TRACKING_LIMIT {
            raw_reads.clear();
        }
        let reads = raw_reads.entry(hour_start).or_default();
        *reads += 1;
        if *reads < RAW_READS_BEFORE_BUILDING {
            return false;
        }
        raw_reads.remove(&hour_start);
        true
    }

    /// A place in the queue of builds, `None` when [`QUEUED_BUILDS`] are queued already.
    pub(crate) fn queue_build(&self) -> Option<QueuedBuild> {
        let place = self.build_places.clone().try_acquire_owned().ok()?;
        Some(QueuedBuild { place, turns: self.build_turns.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 1_800_000_000 / HOUR_SECONDS * HOUR_SECONDS;
    const STAMP: HourStamp = HourStamp { version: 1, events: 9, erasures: 0 };

    fn part(start: i64, end: i64) -> PartialHour {
        PartialHour { start: HOUR + start, end: HOUR + end }
    }

    #[test]
    fn a_summary_answers_the_users_of_an_hour_s_start_or_end_part() {
        let ordinals = |bitmap: RoaringBitmap| bitmap.into_iter().collect::<Vec<u32>>();
        // ordinal, first, last second of the hour
        let users = [(7, 0, 3_599), (3, 100, 100), (9, 1_800, 2_000), (1, 10, 1_799)];
        let summary = HourSummary::new(STAMP, users, []);
        assert_eq!(ordinals(summary.users_within(&part(1_800, 3_600))), vec![7, 9]);
        assert_eq!(ordinals(summary.users_within(&part(1_799, 3_600))), vec![1, 7, 9]);
        assert_eq!(ordinals(summary.users_within(&part(101, 3_600))), vec![1, 7, 9]);
        assert_eq!(ordinals(summary.users_within(&part(0, 100))), vec![1, 7]);
        assert_eq!(ordinals(summary.users_within(&part(0, 101))), vec![1, 3, 7]);
        assert_eq!(ordinals(summary.users_within(&part(0, 1_801))), vec![1, 3, 7, 9]);
        assert_eq!(ordinals(summary.users_within(&part(3_599, 3_600))), vec![7]);
        assert!(HourSummary::answers_users(&part(0, 5)));
        assert!(HourSummary::answers_users(&part(5, 3_600)));
        assert!(
            !HourSummary::answers_users(&part(5, 6)),
            "a user's first and last second cannot tell a middle part"
        );
    }

    #[test]
    fn a_summary_counts_each_name_s_events_in_any_part_of_the_hour() {
        let events = [
            ("b".to_string(), 10, 2),
            ("a".to_string(), 3_599, 1),
            ("a".to_string(), 0, 4),
            ("b".to_string(), 1_800, 5),
            ("a".to_string(), 1_800, 3),
        ];
        let summary = HourSummary::new(STAMP, [], events);
        let counts = |start, end, name| summary.events_within(&part(start, end), name);
        let owned = |pairs: &[(&str, i64)]| {
            pairs.iter().map(|(name, count)| (name.to_string(), *count)).collect::<Vec<_>>()
        };
        assert_eq!(counts(0, 3_600, None), owned(&[("a", 8), ("b", 7)]));
        assert_eq!(counts(1, 3_600, None), owned(&[("a", 4), ("b", 7)]));
        assert_eq!(counts(11, 1_800, None), owned(&[]));
        assert_eq!(counts(10, 1_801, None), owned(&[("a", 3), ("b", 7)]));
        assert_eq!(counts(1_800, 3_599, Some("a")), owned(&[("a", 3)]));
        assert_eq!(counts(0, 1, Some("b")), owned(&[]));
        assert_eq!(summary.entries(), 5);
    }

    #[test]
    fn a_settled_hour_is_built_on_every_second_raw_read() {
        let memory = EdgeHourMemory::default();
        let now = HOUR + 10 * HOUR_SECONDS;
        assert!(!memory.note_raw_read(HOUR, now));
        assert!(!memory.note_raw_read(HOUR + HOUR_SECONDS, now));
        assert!(memory.note_raw_read(HOUR, now));
        assert!(!memory.note_raw_read(HOUR, now), "counting starts over after a build");
        assert!(memory.note_raw_read(HOUR, now));
        let recent = now - HOUR_SECONDS - SETTLED_AFTER_SECONDS + 1;
        assert!(
            !memory.note_raw_read(recent, now) && !memory.note_raw_read(recent, now),
            "still taking traffic"
        );
        let settled = now - HOUR_SECONDS - SETTLED_AFTER_SECONDS;
        assert!(!memory.note_raw_read(settled, now) && memory.note_raw_read(settled, now));
        assert!(memory.get(HOUR).is_none());
        memory.keep(HOUR, HourSummary::new(STAMP, [(1, 0, 0)], []));
        assert_eq!(memory.get(HOUR).unwrap().stamp, STAMP);
    }

    #[tokio::test]
    async fn builds_run_one_at_a_time_and_a_full_queue_drops_the_next() {
        let memory = EdgeHourMemory::default();
        let mut queued: Vec<QueuedBuild> =
            (0..QUEUED_BUILDS).map(|_| memory.queue_build().expect("a place")).collect();
        assert!(memory.queue_build().is_none(), "the queue is full");
        let second = queued.pop().unwrap();
        let first = queued.pop().unwrap().turn().await;
        let mut waiting = tokio::spawn(second.turn());
        let not_yet = tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting).await;
        assert!(not_yet.is_err(), "a second build waits while one runs");
        drop(first);
        let second = waiting.await.expect("the second build gets its turn");
        assert!(memory.queue_build().is_some(), "a finished build frees its place");
        drop(second);
        drop(queued);
        assert_eq!(memory.build_places.available_permits(), QUEUED_BUILDS);
    }
}
