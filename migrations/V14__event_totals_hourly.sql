-- Issue 4, cache validation: events per UTC hour, all names together. The count cache
-- (src/service/counts.rs) stores the rollup part of an answer with the (rows, events) of
-- this table over the answer's whole hours, and reuses it only while they are unchanged:
-- a late event into any of those hours changes them in the transaction that stores it.

CREATE TABLE event_totals_hourly (
    bucket_start TIMESTAMPTZ PRIMARY KEY,
    event_count BIGINT NOT NULL
);

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

    INSERT INTO event_totals_hourly AS totals (bucket_start, event_count)
    SELECT date_trunc('hour', timestamp, 'UTC'), count(*)
    FROM inserted
    GROUP BY 1
    ORDER BY 1
    ON CONFLICT (bucket_start)
    DO UPDATE SET event_count = totals.event_count + EXCLUDED.event_count;

    INSERT INTO user_activity_pending (hour_start, user_id)
    SELECT DISTINCT date_trunc('hour', timestamp, 'UTC'), user_id
    FROM inserted
    WHERE user_id IS NOT NULL AND user_id <> '';

    RETURN NULL;
END $$;

INSERT INTO event_totals_hourly (bucket_start, event_count)
SELECT bucket_start, sum(event_count) FROM event_counts_hourly GROUP BY 1;

CREATE OR REPLACE FUNCTION analytics_forget_rollups_before(boundary timestamptz)
RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(4104202613);
    DELETE FROM event_counts_hourly WHERE bucket_start < boundary;
    DELETE FROM event_counts_daily WHERE bucket_start < boundary;
    DELETE FROM event_totals_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_hourly WHERE bucket_start < boundary;
    DELETE FROM user_activity_daily WHERE bucket_start < boundary;
    DELETE FROM user_activity_pending WHERE hour_start < boundary;
$$;
