-- Count rollups: an insert trigger that only appends, a fold that moves what it appended
-- into per-hour and per-day event counts and per-hour / per-day user bitmaps, and
-- retention that drops whole months of events and their rollups together.
--
-- What the trigger appends, inside the inserting transaction, whatever code inserts:
--   event_count_deltas: per inserting statement, events per (UTC hour, name);
--   user_activity_pending: per inserting statement and UTC hour, the distinct user ids as
--     one array.
-- No row is shared between two inserts, so none waits for another: upserting the rollups
-- inside every insert would make concurrent inserts queue on each other's row locks.
--
-- What `serve` folds them into, about once a second, one replica at a time (advisory lock
-- 4104202613), deleting what it folded in the same transaction
-- (src/repository/postgres/fold.rs):
--   event_counts_hourly and event_counts_daily: events per UTC hour / day and name (days
--     and weeks in any time zone are sums of days and hours);
--   event_totals_hourly: events per UTC hour, all names; the stamp of the count cache
--     (src/service/counts.rs): a fold into an hour changes its row;
--   user_ordinals: a dense integer per identified user, its bit in the bitmaps;
--   user_activity_hourly / user_activity_daily: per UTC hour / day, a roaring bitmap (the
--     portable serialization) of the ordinals of the users with an event in it; `version`
--     grows with every fold that changes the row (the stamp of the user-count cache).
-- Count queries read the rollups and what is not folded yet in one snapshot, so they are
-- exact however far the fold lags.

CREATE TABLE event_counts_hourly (
    bucket_start TIMESTAMPTZ NOT NULL,
    event_name VARCHAR(255) NOT NULL,
    event_count BIGINT NOT NULL,
    PRIMARY KEY (bucket_start, event_name)
);
CREATE INDEX idx_event_counts_hourly_name ON event_counts_hourly (event_name, bucket_start) INCLUDE (event_count);

CREATE TABLE event_count_deltas (
    bucket_start TIMESTAMPTZ NOT NULL,
    event_name VARCHAR(255) NOT NULL,
    event_count BIGINT NOT NULL
);
CREATE INDEX idx_event_count_deltas_bucket ON event_count_deltas (bucket_start);

CREATE TABLE user_activity_pending (
    hour_start TIMESTAMPTZ NOT NULL,
    user_ids TEXT[] NOT NULL
);
-- Rows live about a second: compressing their arrays would cost every insert for nothing.
ALTER TABLE user_activity_pending ALTER COLUMN user_ids SET STORAGE EXTERNAL;
CREATE INDEX idx_user_activity_pending_hour ON user_activity_pending (hour_start);

CREATE TABLE event_counts_daily (
    bucket_start TIMESTAMPTZ NOT NULL,
    event_name VARCHAR(255) NOT NULL,
    event_count BIGINT NOT NULL,
    PRIMARY KEY (bucket_start, event_name)
);
CREATE INDEX idx_event_counts_daily_name ON event_counts_daily (event_name, bucket_start) INCLUDE (event_count);

CREATE TABLE event_totals_hourly (
    bucket_start TIMESTAMPTZ PRIMARY KEY,
    event_count BIGINT NOT NULL
);

CREATE TABLE user_ordinals (
    user_id VARCHAR(255) PRIMARY KEY,
    ordinal INTEGER GENERATED ALWAYS AS IDENTITY (MINVALUE 0 START WITH 0) UNIQUE
);

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

CREATE OR REPLACE FUNCTION analytics_rollup_inserted_events()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_count_deltas (bucket_start, event_name, event_count)
    SELECT date_trunc('hour', timestamp, 'UTC'), event_name, count(*)
    FROM inserted
    GROUP BY 1, 2;

    INSERT INTO user_activity_pending (hour_start, user_ids)
    SELECT date_trunc('hour', timestamp, 'UTC'), array_agg(DISTINCT user_id)
    FROM inserted
    WHERE user_id IS NOT NULL AND user_id <> ''
    GROUP BY 1;

    RETURN NULL;
END $$;

-- Statement-level, reading the transition table: one append per inserting statement.
CREATE TRIGGER events_rollup_after_insert
AFTER INSERT ON events
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT
EXECUTE FUNCTION analytics_rollup_inserted_events();

-- Deletes every rollup row before `boundary` (the end of a dropped month). Takes the
-- fold's lock first (ROLLUP_FOLD_LOCK_KEY in src/repository/postgres/fold.rs), so a fold
-- running meanwhile cannot write rollups of a dropped month back after this deleted them.
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
$$;

-- Retention: drops every partition of `events` that ends at or before `cutoff`, and the
-- rollup rows of its month with it; returns the names of the dropped partitions.
CREATE OR REPLACE FUNCTION analytics_drop_event_partitions_before(cutoff timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    partition record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('analytics_event_partitions'));
    FOR partition IN
        SELECT child.relname::text AS name,
               (to_timestamp(substring(child.relname FROM 9), 'YYYYMM')::timestamp AT TIME ZONE 'UTC')
                   AS month_start
        FROM pg_inherits
        JOIN pg_class parent ON parent.oid = pg_inherits.inhparent
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE parent.relname = 'events' AND child.relname ~ '^events_p[0-9]{6}$'
        ORDER BY child.relname
    LOOP
        IF partition.month_start + interval '1 month' <= cutoff THEN
            EXECUTE format('DROP TABLE %I', partition.name);
            PERFORM analytics_forget_rollups_before(partition.month_start + interval '1 month');
            RETURN NEXT partition.name;
        END IF;
    END LOOP;
END $$;
