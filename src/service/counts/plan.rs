//! Count planning: how the range of a GetEventCount or GetUserCount splits between the
//! day rollups, the hour rollups, the deltas not folded yet and the raw events, and how
//! the parts of an answer add up. Pure computation; the repository runs the plans.

use super::time::next_bucket_boundary;
use crate::models::utc::{ceil_to, floor_to, DAY_SECONDS, HOUR_SECONDS};
use crate::models::{EventCount, EventCountPlan, EventFilter, PartialHour, RangeSplit, TimeRange};

impl RangeSplit {
    /// The whole hours inside `range` come from the hour rows, no day rows.
    pub fn hours(range: TimeRange) -> Self {
        let rollup_start = ceil_to(range.start(), HOUR_SECONDS).min(range.end());
        let rollup_end = floor_to(range.end(), HOUR_SECONDS).max(rollup_start);
        Self {
            start: range.start(),
            rollup_start,
            day_start: rollup_end,
            day_end: rollup_end,
            rollup_end,
            end: range.end(),
        }
    }

    /// The whole UTC days inside the whole hours come from the day rows, when
    /// `day_fits(day_start)` holds for every one of them (else none do).
    pub fn with_whole_days(self, day_fits: impl Fn(i64) -> bool) -> Self {
        let day_start = ceil_to(self.rollup_start, DAY_SECONDS);
        let day_end = floor_to(self.rollup_end, DAY_SECONDS);
        if day_start >= day_end || !(day_start..day_end).step_by(DAY_SECONDS as usize).all(day_fits) {
            return self;
        }
        Self { day_start, day_end, ..self }
    }
}

/// How a unique-user count splits its range: every whole UTC day from the day bitmaps,
/// the other whole UTC hours from the hour bitmaps, the partial hours from the raw events.
pub fn user_count_split(range: TimeRange) -> RangeSplit {
    RangeSplit::hours(range).with_whole_days(|_| true)
}

impl EventCountPlan {
    /// The plan for `filter` over its whole range.
    pub fn of(filter: &EventFilter) -> Self {
        Self::within(filter, Some((filter.range.start(), filter.range.end())))
    }

    /// The plan for `filter` when every event lies in `extent` (`[first, last)`, `None`
    /// when there is none). The range is cut at every bucket boundary of the caller's
    /// zone, walking bucket by bucket (the work grows with the buckets, never with the
    /// hours of the range), and only over the whole UTC hours around the extent, so a
    /// range far wider than the data costs what the data's buckets cost. Inside each piece
    /// the whole UTC days come from the day rows, the other whole UTC hours from the hour
    /// rows, and the rest from the raw events: the partial hours at the range's edges and
    /// at bucket boundaries that are not whole UTC hours (zones offset by 30 or 45
    /// minutes). Touching pieces of one source merge, so UTC days and weeks read one run
    /// of day rows. The split (the cache key and the stamp's hours) stays that of the
    /// whole range.
    pub fn within(filter: &EventFilter, extent: Option<(i64, i64)>) -> Self {
        let mut plan = Self { split: RangeSplit::hours(filter.range), ..Self::default() };
        plan.labelled_edge_hours = (plan.split.partial_hours())
            .map(|part| part.hour().0)
            .filter(|&hour_start| hour_in_one_bucket(filter, hour_start))
            .collect();
        let Some((first, last)) = extent else {
            return plan;
        };
        let start = filter.range.start().max(floor_to(first, HOUR_SECONDS));
        let end = filter.range.end().min(ceil_to(last, HOUR_SECONDS));
        if start >= end {
            return plan;
        }
        let (start, end) = plan.add_edge_hours(filter, start, end, (first, last));
        let Some(group_by) = filter.group_by else {
            plan.add_piece(start, end);
            return plan;
        };
        let mut piece_start = start;
        while piece_start < end {
            let piece_end = next_bucket_boundary(group_by, filter.time_zone, piece_start).min(end);
            plan.add_piece(piece_start, piece_end);
            piece_start = piece_end;
        }
        plan
    }

    /// Reads the partial hours at the edges of `[start, end)` whole, minus the raw events
    /// of their part outside the range, where that part holds fewer events (judged by its
    /// length within `extent`, the span of the stored events: an end hour reaching past
    /// the newest event is nearly empty after the range) and the whole hour lies inside
    /// one bucket, so its hour rows carry the label of the part inside. Returns what is
    /// left for the walk over the buckets.
    fn add_edge_hours(
        &mut self,
        filter: &EventFilter,
        start: i64,
        end: i64,
        extent: (i64, i64),
    ) -> (i64, i64) {
        let (first, last) = extent;
        let within_extent = |from: i64, to: i64| (to.min(last) - from.max(first)).max(0);
        let read_whole = |part: PartialHour| {
            let outside: i64 = part.outside().iter().map(|&(from, to)| within_extent(from, to)).sum();
            outside < within_extent(part.start, part.end) && hour_in_one_bucket(filter, part.hour().0)
        };
        let split = RangeSplit::hours(TimeRange { start, end });
        let mut walk = (start, end);
        for part in split.partial_hours() {
            if !read_whole(part) {
                continue;
            }
            let (hour_start, hour_end) = part.hour();
            self.edge_hours.push(hour_start, hour_end);
            part.outside().into_iter().for_each(|(from, to)| self.raw_outside.push(from, to));
            if part.start == start {
                walk.0 = hour_end.min(end);
            }
            if part.end == end {
                walk.1 = hour_start.max(walk.0);
            }
        }
        walk
    }

    /// Adds `[start, end)`, which lies inside one bucket.
    fn add_piece(&mut self, start: i64, end: i64) {
        let hours_start = ceil_to(start, HOUR_SECONDS);
        let hours_end = floor_to(end, HOUR_SECONDS);
        if hours_start >= hours_end {
            self.raw.push(start, end);
            return;
        }
        self.raw.push(start, hours_start);
        let days_start = ceil_to(hours_start, DAY_SECONDS);
        let days_end = floor_to(hours_end, DAY_SECONDS);
        if days_start < days_end {
            self.hours.push(hours_start, days_start);
            self.days.push(days_start, days_end);
            self.hours.push(days_end, hours_end);
        } else {
            self.hours.push(hours_start, hours_end);
        }
        self.folded.push(hours_start, hours_end);
        self.raw.push(hours_end, end);
    }
}

/// Whether the UTC hour starting at `hour_start` lies inside one bucket of `filter`.
fn hour_in_one_bucket(filter: &EventFilter, hour_start: i64) -> bool {
    filter.group_by.is_none_or(|group_by| {
        next_bucket_boundary(group_by, filter.time_zone, hour_start) >= hour_start + HOUR_SECONDS
    })
}

/// Adds `more` into `counts`; the result is ordered by bucket, then name (bytewise), and
/// leaves out counts that add up to zero (events subtracted by deletions or by an edge
/// hour's part outside the range), as an empty bucket is left out.
///
/// One sort of both and one pass that adds neighbours: a cached hit merges a few fresh
/// counts into thousands of folded ones already in order (cached that way), which the
/// sort finds nearly sorted. No map and no key copies: this ran on every count call.
pub fn merge_event_counts(mut counts: Vec<EventCount>, more: Vec<EventCount>) -> Vec<EventCount> {
    counts.extend(more);
    sort_event_counts(&mut counts);
    let mut merged: Vec<EventCount> = Vec::with_capacity(counts.len());
    for count in counts {
        match merged.last_mut() {
            Some(last) if last.bucket_start == count.bucket_start && last.event_name == count.event_name => {
                last.count += count.count;
            }
            _ => merged.push(count),
        }
    }
    // Deltas of deleted events not folded yet are negative and may cancel a bucket out:
    // a bucket without events is left out.
    merged.retain(|count| count.count != 0);
    merged
}

/// Orders counts by bucket, then name (bytewise): the order of every answer.
pub fn sort_event_counts(counts: &mut [EventCount]) {
    counts.sort_by(|a, b| {
        (a.bucket_start, a.event_name.as_str()).cmp(&(b.bucket_start, b.event_name.as_str()))
    });
}

#[cfg(test)]
mod tests {
    use super::super::time::ZONES;
    use super::*;
    use crate::models::utc::WEEK_SECONDS;
    use crate::models::{GroupBy, Segments};
    use crate::service::validation::MAX_BUCKETS;

    fn range(start: i64, end: i64) -> TimeRange {
        TimeRange { start, end }
    }

    fn filter(start: i64, end: i64, group_by: Option<GroupBy>, zone: chrono_tz::Tz) -> EventFilter {
        EventFilter { event_name: None, range: range(start, end), group_by, time_zone: zone }
    }

    #[test]
    fn a_range_splits_into_raw_edges_and_whole_hours() {
        let split = RangeSplit::hours(range(1_800, 3 * HOUR_SECONDS + 60));
        let expected = RangeSplit {
            start: 1_800,
            rollup_start: 3_600,
            day_start: 10_800,
            day_end: 10_800,
            rollup_end: 10_800,
            end: 10_860,
        };
        assert_eq!(split, expected);
        assert!(split.has_rollup_part());
        let inside_one_hour = RangeSplit::hours(range(100, 200));
        assert_eq!((inside_one_hour.rollup_start, inside_one_hour.rollup_end), (200, 200));
        assert!(!inside_one_hour.has_rollup_part());
    }

    #[test]
    fn whole_days_come_from_the_day_rows_when_every_day_fits() {
        // 2024-01-30 22:30 UTC to 2024-02-02 01:15 UTC: Jan 31 and Feb 1 are whole days.
        let span = range(1_706_653_800, 1_706_836_500);
        let split = RangeSplit::hours(span).with_whole_days(|_| true);
        assert_eq!(split.rollup_start, 1_706_655_600);
        assert_eq!((split.day_start, split.day_end), (1_706_659_200, 1_706_832_000));
        assert_eq!(split.rollup_end, 1_706_835_600);
        assert_eq!(user_count_split(span), split);
        // One day that does not fit a bucket: hours only.
        let refused = RangeSplit::hours(span).with_whole_days(|day| day != 1_706_745_600);
        assert_eq!(refused, RangeSplit::hours(span));
        // Less than a whole day: hours only.
        let short = range(1_706_653_800, 1_706_653_800 + DAY_SECONDS);
        assert_eq!(RangeSplit::hours(short).with_whole_days(|_| true), RangeSplit::hours(short));
        assert_eq!(user_count_split(short), RangeSplit::hours(short));
    }

    /// The plan for `filter` when events lie a day before and after its range, so an edge
    /// hour's part outside the range holds as many events as its length says.
    fn with_events_around(filter: &EventFilter) -> EventCountPlan {
        EventCountPlan::within(
            filter,
            Some((filter.range.start() - DAY_SECONDS, filter.range.end() + DAY_SECONDS)),
        )
    }

    /// The parts of the edge hours inside the range: each edge hour minus its raw rows
    /// outside the range, which must lie inside it.
    fn edge_parts_inside(plan: &EventCountPlan) -> Vec<(i64, i64)> {
        let mut inside = Vec::new();
        for (hour_start, hour_end) in plan.edge_hours.intervals() {
            let mut covered = hour_start;
            for (start, end) in
                plan.raw_outside.intervals().filter(|(start, _)| (hour_start..hour_end).contains(start))
            {
                assert!(end <= hour_end, "outside rows [{start}, {end}) leave their edge hour");
                inside.push((covered, start));
                covered = end;
            }
            inside.push((covered, hour_end));
        }
        inside.retain(|(start, end)| start < end);
        inside
    }

    /// Checks that the plan's sources cover `range` exactly, without overlap (the edge
    /// hours counting for their part inside the range), that the folded segments are the
    /// day and hour segments, that rollup segments are whole UTC days or hours, and that
    /// every edge hour lies inside one bucket.
    fn assert_covers(plan: &EventCountPlan, filter: &EventFilter) {
        let range = filter.range;
        let mut pieces: Vec<(i64, i64)> =
            plan.days.intervals().chain(plan.hours.intervals()).chain(plan.raw.intervals()).collect();
        pieces.extend(edge_parts_inside(plan));
        let outside: i64 = plan.raw_outside.intervals().map(|(start, end)| end - start).sum();
        let edges: i64 = plan.edge_hours.intervals().map(|(start, end)| end - start).sum();
        let inside: i64 = edge_parts_inside(plan).iter().map(|(start, end)| end - start).sum();
        assert_eq!(outside + inside, edges, "outside rows overlap");
        assert!(plan
            .edge_hours
            .intervals()
            .all(|(start, end)| start % HOUR_SECONDS == 0 && end % HOUR_SECONDS == 0));
        for (start, end) in plan.edge_hours.intervals() {
            for hour_start in (start..end).step_by(HOUR_SECONDS as usize) {
                assert!(hour_in_one_bucket(filter, hour_start), "edge hour {hour_start} spans two buckets");
            }
        }
        pieces.sort_unstable();
        let mut covered = range.start();
        for (start, end) in pieces {
            assert_eq!(start, covered, "gap or overlap at {start}");
            covered = end;
        }
        assert_eq!(covered, range.end());
        assert!(plan.days.intervals().all(|(start, end)| start % DAY_SECONDS == 0 && end % DAY_SECONDS == 0));
        assert!(plan
            .hours
            .intervals()
            .all(|(start, end)| start % HOUR_SECONDS == 0 && end % HOUR_SECONDS == 0));
        let mut folded = Segments::default();
        let mut rollup: Vec<(i64, i64)> = plan.days.intervals().chain(plan.hours.intervals()).collect();
        rollup.sort_unstable();
        rollup.into_iter().for_each(|(start, end)| folded.push(start, end));
        assert_eq!(folded, plan.folded);
    }

    #[test]
    fn an_ungrouped_plan_reads_raw_edges_hours_and_days() {
        // 2024-01-30 22:30 UTC to 2024-02-02 01:15 UTC.
        let span = filter(1_706_653_800, 1_706_836_500, None, chrono_tz::UTC);
        let plan = with_events_around(&span);
        assert_covers(&plan, &span);
        assert!(plan.edge_hours.is_empty(), "as many events outside each edge as inside or more");
        assert_eq!(
            plan.raw.intervals().collect::<Vec<_>>(),
            vec![(1_706_653_800, 1_706_655_600), (1_706_835_600, 1_706_836_500)]
        );
        assert_eq!(
            plan.hours.intervals().collect::<Vec<_>>(),
            vec![(1_706_655_600, 1_706_659_200), (1_706_832_000, 1_706_835_600)]
        );
        assert_eq!(plan.days.intervals().collect::<Vec<_>>(), vec![(1_706_659_200, 1_706_832_000)]);
        assert_eq!(plan.folded.intervals().collect::<Vec<_>>(), vec![(1_706_655_600, 1_706_835_600)]);
        assert!(plan.has_rollup_part());
        assert_eq!(plan.segment_count(), 6);
        // Inside one hour: raw rows only, nothing to cache.
        let plan = with_events_around(&filter(100, 200, None, chrono_tz::UTC));
        assert_eq!(plan.raw.intervals().collect::<Vec<_>>(), vec![(100, 200)]);
        assert!(!plan.has_rollup_part());
    }

    #[test]
    fn an_edge_hour_is_read_whole_when_fewer_events_lie_outside_the_range() {
        // 2024-01-30 22:30 UTC to 2024-02-02 01:15 UTC, the newest event at 01:20: the end
        // hour holds 5 minutes of events after the range and 15 inside, the start hour 30
        // minutes on each side.
        let span = filter(1_706_653_800, 1_706_836_500, None, chrono_tz::UTC);
        let plan =
            EventCountPlan::within(&span, Some((span.range.start() - DAY_SECONDS, span.range.end() + 300)));
        assert_covers(&plan, &span);
        assert_eq!(plan.edge_hours.intervals().collect::<Vec<_>>(), vec![(1_706_835_600, 1_706_839_200)]);
        assert_eq!(plan.raw_outside.intervals().collect::<Vec<_>>(), vec![(1_706_836_500, 1_706_839_200)]);
        assert_eq!(plan.raw.intervals().collect::<Vec<_>>(), vec![(1_706_653_800, 1_706_655_600)]);
        assert_eq!(plan.folded.intervals().collect::<Vec<_>>(), vec![(1_706_655_600, 1_706_835_600)]);
        assert_eq!(
            plan.delta_segments().intervals().collect::<Vec<_>>(),
            vec![(1_706_655_600, 1_706_839_200)]
        );
        assert_eq!(plan.split, RangeSplit::hours(span.range), "edge hours stay out of the cached part");
        // A start at 22:20: 20 minutes of events before it, 40 inside.
        let earlier_start = filter(1_706_653_200, 1_706_836_500, None, chrono_tz::UTC);
        let plan = with_events_around(&earlier_start);
        assert_covers(&plan, &earlier_start);
        assert_eq!(plan.edge_hours.intervals().collect::<Vec<_>>(), vec![(1_706_652_000, 1_706_655_600)]);
        assert_eq!(plan.raw_outside.intervals().collect::<Vec<_>>(), vec![(1_706_652_000, 1_706_653_200)]);
        assert_eq!(plan.raw.intervals().collect::<Vec<_>>(), vec![(1_706_835_600, 1_706_836_500)]);
        // A range inside one hour, no event after it: the hour minus its first 10 minutes.
        let recent = filter(1_706_652_600, 1_706_655_000, None, chrono_tz::UTC);
        let plan = EventCountPlan::within(&recent, Some((0, 1_706_655_000)));
        assert_covers(&plan, &recent);
        assert_eq!(plan.edge_hours.intervals().collect::<Vec<_>>(), vec![(1_706_652_000, 1_706_655_600)]);
        assert_eq!(
            plan.raw_outside.intervals().collect::<Vec<_>>(),
            vec![(1_706_652_000, 1_706_652_600), (1_706_655_000, 1_706_655_600)]
        );
        assert!(plan.raw.is_empty() && plan.folded.is_empty());
        // Two edge hours that touch merge; the deltas are read over both.
        let two_hours = filter(1_706_655_000, 1_706_655_600 + 600, None, chrono_tz::UTC);
        let plan = EventCountPlan::of(&two_hours);
        assert_covers(&plan, &two_hours);
        assert_eq!(plan.edge_hours.intervals().collect::<Vec<_>>(), vec![(1_706_652_000, 1_706_659_200)]);
        assert_eq!(plan.raw_outside.len(), 2);
    }

    #[test]
    fn an_edge_hour_across_a_bucket_boundary_stays_raw() {
        // Kolkata (+5:30): local hours start at :30 UTC, so no UTC hour is inside one hour
        // bucket; its days start at 18:30 UTC, so only the 18:00 UTC hour spans two days.
        let kolkata = chrono_tz::Asia::Kolkata;
        let evening = 1_706_637_600; // 2024-01-30 18:00 UTC
        for (group_by, start, whole) in [
            (Some(GroupBy::Hour), evening - 2 * HOUR_SECONDS + 600, false),
            (Some(GroupBy::Day), evening + 600, false),
            (Some(GroupBy::Day), evening - HOUR_SECONDS + 600, true),
            (None, evening + 600, true),
        ] {
            // A day from 10 minutes past an hour, no event after it: each edge hour holds
            // fewer events outside the range than inside.
            let span = filter(start, start + DAY_SECONDS, group_by, kolkata);
            let plan = EventCountPlan::within(&span, Some((0, span.range.end())));
            assert_covers(&plan, &span);
            let start_hour = floor_to(start, HOUR_SECONDS);
            let edges: Vec<(i64, i64)> = plan.edge_hours.intervals().collect();
            assert_eq!(
                edges.iter().any(|(hour_start, _)| *hour_start == start_hour),
                whole,
                "{group_by:?} {start}"
            );
            let end_hour = start_hour + DAY_SECONDS;
            assert_eq!(
                edges.iter().any(|(_, hour_end)| *hour_end == end_hour + HOUR_SECONDS),
                whole,
                "{group_by:?} {start}"
            );
        }
        // Kathmandu (+5:45) days start at 18:15 UTC.
        let span =
            filter(evening + 600, evening + 3 * HOUR_SECONDS, Some(GroupBy::Day), chrono_tz::Asia::Kathmandu);
        let plan = EventCountPlan::within(&span, Some((span.range.start(), span.range.end())));
        assert_covers(&plan, &span);
        assert!(plan.edge_hours.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_plan_within_the_extent_keeps_the_split_of_the_whole_range() {
        let span = filter(0, 10 * DAY_SECONDS, Some(GroupBy::Day), chrono_tz::UTC);
        // Events only on the third day, between 05:10 and 07:20: hours 05:00 to 08:00.
        let third = 2 * DAY_SECONDS;
        let plan = EventCountPlan::within(&span, Some((third + 5 * 3_600 + 600, third + 7 * 3_600 + 1_200)));
        assert_eq!(plan.split, EventCountPlan::of(&span).split);
        assert!(plan.raw.is_empty() && plan.days.is_empty());
        assert_eq!(plan.hours.intervals().collect::<Vec<_>>(), vec![(third + 5 * 3_600, third + 8 * 3_600)]);
        let empty = EventCountPlan::within(&span, None);
        assert_eq!((empty.segment_count(), empty.split), (0, plan.split));
    }

    #[test]
    fn lord_howe_boundaries_after_the_shift_need_no_raw_rows() {
        // 2026-10-04 09:56:19 UTC; Lord Howe moves from +10:30 to +11 at 02:00 that day.
        let plan = with_events_around(&filter(
            1_791_107_779,
            1_791_107_779 + 3 * DAY_SECONDS,
            Some(GroupBy::Day),
            chrono_tz::Australia::Lord_Howe,
        ));
        // 13:00 UTC is a whole hour: only the range's edges are raw, the end hour (56
        // minutes inside the range, 4 after it) read whole minus its last 4 minutes.
        assert_eq!(plan.raw.intervals().collect::<Vec<_>>(), vec![(1_791_107_779, 1_791_108_000)]);
        assert_eq!(plan.edge_hours.intervals().collect::<Vec<_>>(), vec![(1_791_363_600, 1_791_367_200)]);
        assert_eq!(plan.raw_outside.intervals().collect::<Vec<_>>(), vec![(1_791_366_979, 1_791_367_200)]);
        assert_eq!(plan.days.len(), 0);
    }

    #[test]
    fn a_plan_at_the_bucket_cap_grows_with_the_buckets_not_the_hours() {
        // 10,000 buckets of each grouping, ending 2026-12-01 at a minute past a half hour.
        let end = 1_796_083_200 + 1_860;
        for zone in ZONES {
            for group_by in [GroupBy::Hour, GroupBy::Day, GroupBy::Week] {
                let start = end - (MAX_BUCKETS - 1) * group_by.seconds();
                let span = range(start, end);
                assert!(group_by.bucket_count(span) <= MAX_BUCKETS);
                let plan = EventCountPlan::of(&filter(start, end, Some(group_by), zone));
                assert_covers(&plan, &filter(start, end, Some(group_by), zone));
                // Each bucket adds at most one run of days, raw rows and folded rows, and
                // two of hours (around its days, split by raw rows where a boundary is not
                // a whole UTC hour).
                let buckets = group_by.bucket_count(span) as usize;
                for segments in [&plan.days, &plan.raw, &plan.folded] {
                    assert!(
                        segments.len() <= buckets + 2,
                        "{zone} {group_by:?}: {} segments",
                        segments.len()
                    );
                }
                assert!(
                    plan.hours.len() <= 2 * buckets + 2,
                    "{zone} {group_by:?}: {} hours",
                    plan.hours.len()
                );
                if zone == chrono_tz::UTC {
                    // UTC buckets are whole hours and days: one run each, raw only at the edges.
                    assert!(
                        plan.days.len() <= 1 && plan.hours.len() <= 2 && plan.raw.len() <= 2,
                        "{group_by:?}: {plan:?}"
                    );
                }
            }
        }
        // Events only in the last 90 days of 190 years of Berlin weeks: the walk covers
        // their 14 weeks, not the 10,000 of the range; no events, no segments at all.
        let weeks = filter(end - 9_999 * WEEK_SECONDS, end, Some(GroupBy::Week), chrono_tz::Europe::Berlin);
        let recent = EventCountPlan::within(&weeks, Some((end - 90 * DAY_SECONDS, end)));
        assert!(recent.segment_count() <= 4 * 15, "{recent:?}");
        assert_eq!(recent.split, EventCountPlan::of(&weeks).split, "the cache key covers the whole range");
        assert_eq!(EventCountPlan::within(&weeks, None).segment_count(), 0);
        // Ungrouped over 190 years: one run of days, whole hours and raw only at the edges.
        let later = end + 3 * HOUR_SECONDS;
        let centuries = filter(later - 190 * 365 * DAY_SECONDS - 7, later, None, chrono_tz::UTC);
        let plan = with_events_around(&centuries);
        // The end hour holds less of the range than of what follows: read whole.
        assert_eq!((plan.days.len(), plan.hours.len(), plan.raw.len(), plan.edge_hours.len()), (1, 2, 1, 1));
        // With events only inside the range, both edge hours are read whole.
        let plan = EventCountPlan::of(&centuries);
        assert_eq!((plan.days.len(), plan.hours.len(), plan.raw.len(), plan.edge_hours.len()), (1, 2, 0, 2));
    }

    #[test]
    fn berlin_weeks_read_day_rows_inside_and_hour_rows_around_local_midnight() {
        // Monday 2026-01-05 00:00 CET is Sunday 23:00 UTC; two whole weeks.
        let monday = 1_767_567_600;
        let span = range(monday, monday + 2 * WEEK_SECONDS);
        let weeks = filter(span.start(), span.end(), Some(GroupBy::Week), chrono_tz::Europe::Berlin);
        let plan = EventCountPlan::of(&weeks);
        assert_covers(&plan, &weeks);
        assert!(plan.raw.is_empty());
        let day = monday + HOUR_SECONDS;
        assert_eq!(
            plan.days.intervals().collect::<Vec<_>>(),
            vec![(day, day + 6 * DAY_SECONDS), (day + WEEK_SECONDS, day + WEEK_SECONDS + 6 * DAY_SECONDS)]
        );
        // Kolkata (+5:30) days: boundaries at 18:30 UTC, one raw hour around each.
        let days = filter(span.start(), span.end(), Some(GroupBy::Day), chrono_tz::Asia::Kolkata);
        let plan = EventCountPlan::of(&days);
        assert_covers(&plan, &days);
        assert_eq!(plan.raw.len(), 14);
        assert!(plan
            .raw
            .intervals()
            .skip(1)
            .all(|(start, end)| end - start == HOUR_SECONDS && start % HOUR_SECONDS == 0));
    }

    #[test]
    fn merged_counts_add_up_per_bucket_and_name_in_bytewise_order() {
        let count = |event_name: &str, bucket_start, count| EventCount {
            event_name: event_name.to_string(),
            bucket_start,
            count,
        };
        let folded = vec![count("view", 0, 2), count("b", 3_600, 1), count("B", 0, 4)];
        let fresh = vec![count("view", 0, 3), count("a", 3_600, 1)];
        assert_eq!(
            merge_event_counts(folded, fresh),
            vec![count("B", 0, 4), count("view", 0, 5), count("a", 3_600, 1), count("b", 3_600, 1)]
        );
        assert_eq!(merge_event_counts(Vec::new(), Vec::new()), Vec::new());
        // Deltas of deleted events cancel a bucket out; a key may come twice from one side.
        let folded = vec![count("a", 0, 2), count("c", 0, 1)];
        let fresh = vec![count("c", 0, 1), count("a", 0, -2), count("c", 0, 1)];
        assert_eq!(merge_event_counts(folded, fresh), vec![count("c", 0, 3)]);
    }
}
