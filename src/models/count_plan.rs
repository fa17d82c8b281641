//! What a count query reads, as the repository executes it: which UTC intervals come
//! from the day rollups, the hour rollups, the deltas not folded yet and the raw events.
//! The service builds these plans (`service::counts::plan`); the repository only runs
//! them. Every instant is in Unix seconds.

use chrono::{DateTime, Utc};

use super::utc::time;

/// How a range splits between the rollups and the raw events:
/// raw rows `[start, rollup_start)`, hour rows `[rollup_start, day_start)`, day rows
/// `[day_start, day_end)`, hour rows `[day_end, rollup_end)`, raw rows `[rollup_end, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeSplit {
    pub start: i64,
    pub rollup_start: i64,
    pub day_start: i64,
    pub day_end: i64,
    pub rollup_end: i64,
    pub end: i64,
}

impl RangeSplit {
    /// The six bounds as instants, in order.
    pub fn instants(&self) -> [DateTime<Utc>; 6] {
        [self.start, self.rollup_start, self.day_start, self.day_end, self.rollup_end, self.end].map(time)
    }

    /// Whether any whole hour comes from the rollups.
    pub fn has_rollup_part(&self) -> bool {
        self.rollup_start < self.rollup_end
    }
}

/// Sorted, disjoint UTC intervals `[start, end)`; touching ones merge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    starts: Vec<i64>,
    ends: Vec<i64>,
}

impl Segments {
    /// Appends `[start, end)`, which must not start before the last interval ends; an
    /// empty interval is ignored, one touching the last interval extends it.
    pub fn push(&mut self, start: i64, end: i64) {
        if start >= end {
            return;
        }
        match self.ends.last_mut() {
            Some(last_end) if *last_end == start => *last_end = end,
            _ => {
                self.starts.push(start);
                self.ends.push(end);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The intervals as `(start, end)` pairs.
    pub fn intervals(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.starts.iter().copied().zip(self.ends.iter().copied())
    }

    /// The starts and the ends as instants, the two arrays a query unnests.
    pub fn bounds(&self) -> (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) {
        (self.starts.iter().copied().map(time).collect(), self.ends.iter().copied().map(time).collect())
    }
}

/// How one GetEventCount is read. Each segment lies inside one bucket of the caller's
/// zone, so a row read is labelled by its own start; whole UTC days come from the day
/// rows, other whole UTC hours from the hour rows (plus their deltas not folded yet), and
/// the rest from the raw events.
#[derive(Clone, Debug, Default)]
pub struct EventCountPlan {
    /// The whole UTC hours of the range: the cached folded part is keyed by them, and
    /// its stamp covers them.
    pub split: RangeSplit,
    pub days: Segments,
    pub hours: Segments,
    /// The day and hour segments together: where the deltas not folded yet are read.
    pub folded: Segments,
    pub raw: Segments,
}

impl EventCountPlan {
    /// Whether any whole hour comes from the rollups.
    pub fn has_rollup_part(&self) -> bool {
        !self.folded.is_empty()
    }

    /// Index range scans the plan costs: one per segment of each source (the deltas
    /// read over the folded segments).
    pub fn segment_count(&self) -> usize {
        self.days.len() + self.hours.len() + self.folded.len() + self.raw.len()
    }
}

/// A version of the rollup part of a range: (rows, sum of versions) over the rows that a
/// change to the part must touch, and the erasure generation (every erasure batch bumps
/// it, so an answer cached before an erasure is never reused after). Equal stamps mean
/// an unchanged part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RollupStamp {
    pub rows: i64,
    pub sum: i64,
    pub erasures: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_segments_merge_and_empty_ones_vanish() {
        let mut segments = Segments::default();
        segments.push(0, 10);
        segments.push(10, 20);
        segments.push(25, 25);
        segments.push(30, 40);
        assert_eq!(segments.intervals().collect::<Vec<_>>(), vec![(0, 20), (30, 40)]);
        assert_eq!(segments.len(), 2);
        let (starts, ends) = segments.bounds();
        assert_eq!((starts[1].timestamp(), ends[1].timestamp()), (30, 40));
    }
}
