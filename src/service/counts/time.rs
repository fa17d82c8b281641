//! Bucket boundaries in the caller's time zone: where the local hour, day or week of a
//! GetEventCount bucket changes, found from the zone's UTC offsets (chrono-tz) with a
//! handful of lookups per bucket.

use chrono::{Offset, TimeZone};

use crate::models::utc::{floor_to, time, DAY_SECONDS, HOUR_SECONDS, WEEK_SECONDS};
use crate::models::GroupBy;

/// The offset of `zone` from UTC at `seconds`, in seconds.
fn utc_offset(zone: chrono_tz::Tz, seconds: i64) -> i64 {
    i64::from(zone.offset_from_utc_datetime(&time(seconds).naive_utc()).fix().local_minus_utc())
}

/// The first instant after `instant` at which the bucket of `group_by` in `zone` may
/// change: the next local hour, midnight or Monday midnight, and for hours also the next
/// change of the zone's offset (a 30-minute DST shift moves the hour label). An extra
/// boundary only splits a segment of the plan; a missed one would let a rollup row
/// straddle two buckets, so boundaries err on the side of too many.
pub(super) fn next_bucket_boundary(group_by: GroupBy, zone: chrono_tz::Tz, instant: i64) -> i64 {
    let local = instant + utc_offset(zone, instant);
    let (target_local, stop_at_offset_change) = match group_by {
        GroupBy::Hour => (floor_to(local, HOUR_SECONDS) + HOUR_SECONDS, true),
        GroupBy::Day => (floor_to(local, DAY_SECONDS) + DAY_SECONDS, false),
        GroupBy::Week => {
            // 1970-01-05 was a Monday: local weeks start 4 days after a multiple of 7 days.
            let monday = floor_to(local - 4 * DAY_SECONDS, WEEK_SECONDS) + 4 * DAY_SECONDS;
            (monday + WEEK_SECONDS, false)
        }
    };
    first_instant_reaching(zone, instant, target_local, stop_at_offset_change)
}

/// The first instant after `from` whose local time in `zone` (seconds since the local
/// epoch) is at least `target_local`, which lies after `from`'s local time; or, with
/// `stop_at_offset_change`, the first change of the zone's offset if that comes earlier.
/// A handful of offset lookups per call; a transition in between is found by bisection.
fn first_instant_reaching(
    zone: chrono_tz::Tz,
    from: i64,
    target_local: i64,
    stop_at_offset_change: bool,
) -> i64 {
    let mut instant = from;
    loop {
        let offset = utc_offset(zone, instant);
        if instant > from && instant + offset >= target_local {
            return instant;
        }
        // Reached at `candidate` if the offset stays as it is until then.
        let candidate = target_local - offset;
        let change = if utc_offset(zone, candidate - 1) != offset {
            first_offset_change(zone, instant, candidate - 1, offset)
        } else if utc_offset(zone, candidate) != offset {
            candidate
        } else {
            return candidate;
        };
        if stop_at_offset_change {
            return change;
        }
        instant = change;
    }
}

/// The first instant in `(low, high]` whose offset differs from `offset`, the offset at
/// `low`; the offset at `high` differs.
fn first_offset_change(zone: chrono_tz::Tz, mut low: i64, mut high: i64, offset: i64) -> i64 {
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if utc_offset(zone, middle) == offset {
            low = middle;
        } else {
            high = middle;
        }
    }
    high
}

/// Zones with every kind of offset: whole hours with and without DST, 30 and 45 minutes,
/// and DST shifts of 30 minutes (Lord Howe) and at :45 (Chatham).
#[cfg(test)]
pub(super) const ZONES: [chrono_tz::Tz; 8] = [
    chrono_tz::UTC,
    chrono_tz::Europe::Berlin,
    chrono_tz::America::New_York,
    chrono_tz::Asia::Kolkata,
    chrono_tz::Asia::Kathmandu,
    chrono_tz::Australia::Lord_Howe,
    chrono_tz::Pacific::Chatham,
    chrono_tz::America::St_Johns,
];

#[cfg(test)]
mod tests {
    use chrono::{Datelike, Timelike};

    use super::*;

    /// The bucket label the SQL gives an instant, computed with chrono: the local hour's
    /// start, or the local date of the day or of the week's Monday.
    fn label(group_by: GroupBy, zone: chrono_tz::Tz, seconds: i64) -> i64 {
        let local = zone.from_utc_datetime(&time(seconds).naive_utc());
        let date = local.date_naive();
        match group_by {
            GroupBy::Hour => seconds - i64::from(local.minute()) * 60 - i64::from(local.second()),
            GroupBy::Day => i64::from(date.num_days_from_ce()),
            GroupBy::Week => {
                i64::from(date.num_days_from_ce()) - i64::from(date.weekday().num_days_from_monday())
            }
        }
    }

    #[test]
    fn bucket_boundaries_are_where_the_label_changes() {
        // Two years with every DST transition of these zones, stepped by 15 minutes: the
        // label is constant between two boundaries and changes at each one.
        let from = 1_767_225_600; // 2026-01-01
        for zone in ZONES {
            for group_by in [GroupBy::Hour, GroupBy::Day, GroupBy::Week] {
                let mut boundary = from;
                while boundary < from + 2 * 365 * DAY_SECONDS {
                    let next = next_bucket_boundary(group_by, zone, boundary);
                    assert!(next > boundary);
                    let inside = label(group_by, zone, boundary);
                    let mut instant = boundary;
                    while instant < next {
                        assert_eq!(
                            label(group_by, zone, instant),
                            inside,
                            "{zone} {group_by:?} at {instant}"
                        );
                        instant += 900;
                    }
                    assert_eq!(
                        label(group_by, zone, next - 1),
                        inside,
                        "{zone} {group_by:?} at {}",
                        next - 1
                    );
                    if group_by != GroupBy::Hour {
                        assert_ne!(label(group_by, zone, next), inside, "{zone} {group_by:?} at {next}");
                    }
                    boundary = next;
                }
            }
        }
    }

    #[test]
    fn lord_howe_days_start_at_local_midnight() {
        // Lord Howe moves from +10:30 to +11 at 02:00 on 2026-10-04, so the local day that
        // began at 2026-10-03 13:30 UTC ends at 2026-10-04 13:00 UTC.
        let midnight = 1_791_034_200;
        assert_eq!(
            next_bucket_boundary(GroupBy::Day, chrono_tz::Australia::Lord_Howe, midnight),
            midnight + DAY_SECONDS - 1_800
        );
    }

    #[test]
    fn offset_changes_are_found_to_the_second() {
        // Berlin goes from +1 to +2 at 2026-03-29 01:00 UTC.
        let change = 1_774_746_000;
        let berlin = chrono_tz::Europe::Berlin;
        assert_eq!(first_offset_change(berlin, change - 86_400, change + 3_600, 3_600), change);
        // The hour bucket ends at the change.
        assert_eq!(next_bucket_boundary(GroupBy::Hour, berlin, change - 1_800), change);
    }
}
