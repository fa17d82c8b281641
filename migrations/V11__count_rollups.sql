-- Issue 4: rollups kept in the same transaction as the event rows, whatever code inserts
-- them, by a statement-level AFTER INSERT trigger reading the transition table.
--
-- event_counts_hourly: events per (UTC hour, name). Days and weeks (in any time zone with
-- whole-hour offsets) are sums of hours.
-- user_activity_monthly: per (UTC month, user), bit d set when the user has an event on
-- day d+1 of that month; whole days of a GetUserCount range read it.
-- user_activity_daily: per (UTC day, user), bit h set when the user has an event in hour h;
-- the partial days at the edges of a range read it. Partial hours read `events`.

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
    day_mask INTEGER NOT NULL,
    PRIMARY KEY (month, user_id)
);

CREATE TABLE user_activity_daily (
    day DATE NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    hour_mask INTEGER NOT NULL,
    PRIMARY KEY (day, user_id)
);

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

    INSERT INTO user_activity_daily AS activity (day, user_id, hour_mask)
    SELECT (timestamp AT TIME ZONE 'UTC')::date, user_id,
           bit_or(1 << extract(hour FROM timestamp AT TIME ZONE 'UTC')::integer)
    FROM inserted
    WHERE user_id IS NOT NULL AND user_id <> ''
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (day, user_id)
    DO UPDATE SET hour_mask = activity.hour_mask | EXCLUDED.hour_mask
    WHERE activity.hour_mask | EXCLUDED.hour_mask <> activity.hour_mask;

    INSERT INTO user_activity_monthly AS activity (month, user_id, day_mask)
    SELECT date_trunc('month', timestamp AT TIME ZONE 'UTC')::date, user_id,
           bit_or(1 << (extract(day FROM timestamp AT TIME ZONE 'UTC')::integer - 1))
    FROM inserted
    WHERE user_id IS NOT NULL AND user_id <> ''
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (month, user_id)
    DO UPDATE SET day_mask = activity.day_mask | EXCLUDED.day_mask
    WHERE activity.day_mask | EXCLUDED.day_mask <> activity.day_mask;

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
INSERT INTO user_activity_daily (day, user_id, hour_mask)
SELECT (timestamp AT TIME ZONE 'UTC')::date, user_id,
       bit_or(1 << extract(hour FROM timestamp AT TIME ZONE 'UTC')::integer)
FROM events WHERE user_id IS NOT NULL AND user_id <> '' GROUP BY 1, 2;
INSERT INTO user_activity_monthly (month, user_id, day_mask)
SELECT date_trunc('month', timestamp AT TIME ZONE 'UTC')::date, user_id,
       bit_or(1 << (extract(day FROM timestamp AT TIME ZONE 'UTC')::integer - 1))
FROM events WHERE user_id IS NOT NULL AND user_id <> '' GROUP BY 1, 2;

CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$
    DELETE FROM event_counts_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_daily WHERE day < (boundary AT TIME ZONE 'UTC')::date;
    DELETE FROM user_activity_monthly WHERE month < (boundary AT TIME ZONE 'UTC')::date;
$$;
