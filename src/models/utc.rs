//! Whole UTC hours and days in Unix seconds: the units the count rollups are kept in.

use chrono::{DateTime, Utc};

pub const HOUR_SECONDS: i64 = 3_600;
pub const DAY_SECONDS: i64 = 86_400;
pub const WEEK_SECONDS: i64 = 7 * DAY_SECONDS;

/// `seconds` rounded down to a multiple of `unit`.
pub fn floor_to(seconds: i64, unit: i64) -> i64 {
    seconds.div_euclid(unit) * unit
}

/// `seconds` rounded up to a multiple of `unit`.
pub fn ceil_to(seconds: i64, unit: i64) -> i64 {
    -floor_to(-seconds, unit)
}

/// The instant `seconds` after the Unix epoch (the epoch itself when out of range).
pub fn time(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_works_on_both_sides_of_the_epoch() {
        assert_eq!(floor_to(3_599, HOUR_SECONDS), 0);
        assert_eq!(floor_to(-1, HOUR_SECONDS), -HOUR_SECONDS);
        assert_eq!(ceil_to(1, HOUR_SECONDS), HOUR_SECONDS);
        assert_eq!(ceil_to(-1, HOUR_SECONDS), 0);
        assert_eq!(ceil_to(DAY_SECONDS, DAY_SECONDS), DAY_SECONDS);
    }
}
