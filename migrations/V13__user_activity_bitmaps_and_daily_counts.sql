-- Issue 4, second step: exact unique users from per-hour and per-day user bitmaps, and
-- per-day event counts, so that a 30-day or 90-day question reads tens of rows instead of
-- one row per user (V11's user_activity_monthly needed a scan and a distinct over every
-- active user and month: 0.4 s for 30 days at 10M events).
--
-- user_ordinals: a dense integer per identified user, its bit in the bitmaps.
-- user_activity_pending: (UTC hour, users) rows that the insert trigger appends inside the
--   inserting transaction: per inserting statement and hour, the distinct user ids as one
--   array (one row per statement and hour, not per event, keeps the trigger cheap). `serve` folds them into the bitmaps about once a second
--   (src/repository/postgres/fold.rs) and deletes them in the same transaction,
--   so every pair is always in exactly one of the two places. A count reads the bitmaps
--   and the pending pairs in one snapshot: exact, however far the fold lags.
-- user_activity_hourly / user_activity_daily: per UTC hour / day, a roaring bitmap (the
--   portable serialization) of the ordinals of the users with an event in it. `version`
--   grows with every fold that changes the row.
-- event_counts_daily: events per (UTC day, name), kept by the trigger next to the hours.

CREATE TABLE user_ordinals (
    user_id VARCHAR(255) PRIMARY KEY,
    ordinal INTEGER GENERATED ALWAYS AS IDENTITY (MINVALUE 0 START WITH 0) UNIQUE
);

CREATE TABLE user_activity_pending (
    hour_start TIMESTAMPTZ NOT NULL,
    user_ids TEXT[] NOT NULL
);
-- Rows live about a second: compressing their arrays would cost every insert for nothing.
ALTER TABLE user_activity_pending ALTER COLUMN user_ids SET STORAGE EXTERNAL;
CREATE INDEX idx_user_activity_pending_hour ON user_activity_pending (hour_start);

CREATE TABLE user_activity_hourly (
    bucket_start TIMESTAMPTZ PRIMARY KEY,
    users BYTEA NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE user_activity_daily (
    bucket_start TIMESTAMPTZ PRIMARY KEY,
    users BYTEA NOT NULL,
    version BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE event_counts_daily (
    bucket_start TIMESTAMPTZ NOT NULL,
    event_name VARCHAR(255) NOT NULL,
    event_count BIGINT NOT NULL,
    PRIMARY KEY (bucket_start, event_name)
);
CREATE INDEX idx_event_counts_daily_name ON event_counts_daily (event_name, bucket_start) INCLUDE (event_count);

-- Keys are sorted before upserting, so concurrent batches lock shared rows in the same
-- order and cannot deadlock. The pending pairs are plain inserts: no row is shared.
CREATE OR REPLACE FUNCTION analytics_rollup_inserted_events()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_counts_hourly AS rollup (bucket_start, event_name, event_count)
    SELECT date_trunc('hour', timestamp, 'UTC'), event_name, count(*)
    FROM inserted
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (bucket_start, event_name)
    DO UPDATE SET event_count = rollup.event_count + EXCLUDED.event_count;

    INSERT INTO event_counts_daily AS rollup (bucket_start, event_name, event_count)
    SELECT date_trunc('day', timestamp, 'UTC'), event_name, count(*)
    FROM inserted
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (bucket_start, event_name)
    DO UPDATE SET event_count = rollup.event_count + EXCLUDED.event_count;

    INSERT INTO user_activity_pending (hour_start, user_ids)
    SELECT date_trunc('hour', timestamp, 'UTC'), array_agg(DISTINCT user_id)
    FROM inserted
    WHERE user_id IS NOT NULL AND user_id <> ''
    GROUP BY 1;

    RETURN NULL;
END $$;

-- Backfill from the rows already there: day counts from the hours, and every (hour, user)
-- pair as pending, folded by the first `serve` (counts stay exact meanwhile).
INSERT INTO event_counts_daily (bucket_start, event_name, event_count)
SELECT date_trunc('day', bucket_start, 'UTC'), event_name, sum(event_count)
FROM event_counts_hourly GROUP BY 1, 2;
INSERT INTO user_activity_pending (hour_start, user_ids)
SELECT date_trunc('hour', timestamp, 'UTC'), array_agg(DISTINCT user_id)
FROM events WHERE user_id IS NOT NULL AND user_id <> '' GROUP BY 1;

DROP TABLE user_activity_monthly;
DROP FUNCTION analytics_hour_of_month(timestamptz);

-- Takes the fold's lock first (the key is ROLLUP_FOLD_LOCK_KEY in
-- src/repository/postgres/fold.rs), so a fold running meanwhile cannot write
-- bitmaps of a dropped month back after this deleted them.
CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(4104202613);
    DELETE FROM event_counts_hourly WHERE bucket_start < boundary;
    DELETE FROM event_counts_daily WHERE bucket_start < boundary;
    DELETE FROM user_activity_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_daily WHERE bucket_start < boundary;
    DELETE FROM user_activity_pending WHERE hour_start < boundary;
$$;
