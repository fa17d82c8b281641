-- Per closed UTC hour, each identified user's first and last second in it: what a
-- unique-user count needs of a partial edge hour. The users of [s, hour end) are those
-- whose last second is at or after s, those of [hour start, e) those whose first second
-- is before e; without this row the count reads the part's raw events (thousands per
-- call at 10M events) and looks up their ordinals.
--
-- Written by the span builder (src/repository/postgres/hour_spans.rs) from one snapshot
-- of a settled hour (no event-count deltas or pending users of it), stamped with the
-- hour's row of event_totals_hourly (version, event_count). A count uses a row only when
-- its own snapshot shows the same stamp and the hour still settled: every insert or
-- delete in the hour appends deltas and pending users until a fold moves them and bumps
-- the version, so a changed hour is read raw until the builder writes it again.
--
-- spans: per user, ordered by ordinal, 8 bytes big-endian: ordinal (int4), first second
-- (int2), last second into the hour (int2).
CREATE TABLE user_activity_hour_spans (
    hour_start TIMESTAMPTZ PRIMARY KEY,
    version BIGINT NOT NULL,
    event_count BIGINT NOT NULL,
    spans BYTEA NOT NULL
);
-- Read whole by every count that uses it; ordinals in no particular pattern compress
-- poorly, and decompressing would cost each read.
ALTER TABLE user_activity_hour_spans ALTER COLUMN spans SET STORAGE EXTERNAL;

-- Retention forgets the spans of a dropped month with its other rollups.
CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(4104202613);
    DELETE FROM event_counts_hourly WHERE bucket_start < boundary;
    DELETE FROM event_counts_daily WHERE bucket_start < boundary;
    DELETE FROM event_totals_hourly WHERE bucket_start < boundary;
    DELETE FROM event_count_deltas WHERE bucket_start < boundary;
    DELETE FROM user_activity_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_daily WHERE bucket_start < boundary;
    DELETE FROM user_activity_pending WHERE hour_start < boundary;
    DELETE FROM user_activity_hour_spans WHERE hour_start < boundary;
$$;
