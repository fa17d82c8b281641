-- Issue 4: rollups kept in the same transaction as the event rows, whatever code inserts
-- them, by a statement-level AFTER INSERT trigger reading the transition table.
--
-- event_counts_hourly: events per (UTC hour, name). Days and weeks (in any time zone with
-- whole-hour offsets) are sums of hours.
-- user_activity_monthly: per (UTC month, user), a 744-bit map (31 days x 24 hours) with
-- bit (day - 1) * 24 + hour set when the user has an event in that UTC hour. An exact
-- GetUserCount over any range reads one row per active user and month for the whole
-- hours, and `events` only for the partial hours at the edges. One upsert per
-- (month, user) and batch keeps the trigger's cost low.

CREATE TABLE event_counts_hourly (
    bucket_start TIMESTAMPTZ NOT NULL,
    event_name VARCHAR(255) NOT NULL,
    event_count BIGINT NOT NULL,
    PRIMARY KEY (bucket_start, event_name)
);
CREATE INDEX idx_event_counts_hourly_name ON event_counts_hourly (event_name, bucket_start) INCLUDE (event_count);

CREATE TABLE user_activity_monthly (
    month DATE NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    active_hours BIT(744) NOT NULL,
    PRIMARY KEY (month, user_id)
);

-- The bit of `at` in its month's map.
CREATE OR REPLACE FUNCTION analytics_hour_of_month(at timestamptz)
RETURNS integer
IMMUTABLE LANGUAGE sql AS $$
    SELECT (extract(day FROM at AT TIME ZONE 'UTC')::integer - 1) * 24
           + extract(hour FROM at AT TIME ZONE 'UTC')::integer
$$;

-- Keys are sorted before upserting, so concurrent batches lock shared rows in the same
-- order and cannot deadlock.
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

    INSERT INTO user_activity_monthly AS activity (month, user_id, active_hours)
    SELECT date_trunc('month', timestamp AT TIME ZONE 'UTC')::date, user_id,
           bit_or(set_bit(B'0'::bit(744), analytics_hour_of_month(timestamp), 1))
    FROM inserted
    WHERE user_id IS NOT NULL AND user_id <> ''
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (month, user_id)
    DO UPDATE SET active_hours = activity.active_hours | EXCLUDED.active_hours
    WHERE activity.active_hours | EXCLUDED.active_hours <> activity.active_hours;

    RETURN NULL;
END $$;

CREATE TRIGGER events_rollup_after_insert
AFTER INSERT ON events
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT
EXECUTE FUNCTION analytics_rollup_inserted_events();

-- Backfill from the rows already there (moved by V10).
INSERT INTO event_counts_hourly (bucket_start, event_name, event_count)
SELECT date_trunc('hour', timestamp, 'UTC'), event_name, count(*) FROM events GROUP BY 1, 2;
INSERT INTO user_activity_monthly (month, user_id, active_hours)
SELECT date_trunc('month', timestamp AT TIME ZONE 'UTC')::date, user_id,
       bit_or(set_bit(B'0'::bit(744), analytics_hour_of_month(timestamp), 1))
FROM events WHERE user_id IS NOT NULL AND user_id <> '' GROUP BY 1, 2;

CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$
    DELETE FROM event_counts_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_monthly WHERE month < (boundary AT TIME ZONE 'UTC')::date;
$$;
