//! What a count query reads, as the repository executes it: which UTC intervals come
//! from the day rollups, the hour rollups, the deltas not folded yet and the raw events.
//! The service builds these plans (`service::counts::plan`); the repository only runs
//! them. Every instant is in Unix seconds.

use chrono::{DateTime, Utc};

use super::utc::{floor_to, time, HOUR_SECONDS};

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

    /// The partial hours at the range's edges, `[start, rollup_start)` and
    /// `[rollup_end, end)` when not empty; a range inside one hour has one.
    pub fn partial_hours(&self) -> impl Iterator<Item = PartialHour> {
        [(self.start, self.rollup_start), (self.rollup_end, self.end)]
            .into_iter()
            .filter(|(start, end)| start < end)
            .map(|(start, end)| PartialHour { start, end })
    }
}

/// The part `[start, end)` of one UTC hour that a range covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialHour {
    pub start: i64,
    pub end: i64,
}

impl PartialHour {
    /// The whole hour `[start, end)` this part lies in.
    pub fn hour(&self) -> (i64, i64) {
        let hour_start = floor_to(self.start, HOUR_SECONDS);
        (hour_start, hour_start + HOUR_SECONDS)
    }

    /// The rest of the hour, before and after the part (either may be empty).
    pub fn outside(&self) -> [(i64, i64); 2] {
        let (hour_start, hour_end) = self.hour();
        [(hour_start, self.start), (self.end, hour_end)]
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
/// the rest from the raw events, except that an hour cut by the range's edge may be read
/// whole, minus the raw events of its part outside the range.
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
    /// Hours cut by the range's edges that are read whole, always fresh: their hour rows
    /// and deltas, minus the raw events of `raw_outside`. Chosen when fewer events lie in
    /// the part outside the range than inside it (an open end hour has none after now).
    pub edge_hours: Segments,
    /// The parts of `edge_hours` outside the range, whose raw events are subtracted.
    pub raw_outside: Segments,
    /// The range's partial UTC hours that lie inside one bucket: raw rows in them all carry
    /// one label, so a summary of the hour may stand in for them (see
    /// `repository::postgres::edge_hours`).
    pub labelled_edge_hours: Vec<i64>,
}

impl EventCountPlan {
    /// Whether any whole hour comes from the rollups.
    pub fn has_rollup_part(&self) -> bool {
        !self.folded.is_empty()
    }

    /// Index range scans the plan costs: one per segment of each source (the deltas
    /// read over the folded segments and the edge hours).
    pub fn segment_count(&self) -> usize {
        self.days.len()
            + self.hours.len()
            + self.delta_segments().len()
            + self.raw.len()
            + self.edge_hours.len()
            + self.raw_outside.len()
    }

    /// Where the deltas not folded yet are read: the folded segments and the edge hours.
    pub fn delta_segments(&self) -> Segments {
        let mut intervals: Vec<(i64, i64)> =
            self.folded.intervals().chain(self.edge_hours.intervals()).collect();
        intervals.sort_unstable();
        let mut segments = Segments::default();
        intervals.into_iter().for_each(|(start, end)| segments.push(start, end));
        segments
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
