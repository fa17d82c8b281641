-- The rollup insert trigger in one pass over the inserting statement's rows: a single
-- statement (one executor start per insert) reads the transition table once into a
-- materialized list of (UTC hour, name, user), then appends the events per (hour, name)
-- to event_count_deltas and the distinct users per hour, as one array, to
-- user_activity_pending; the fold and the count queries read those rows as they are.
--
-- The UTC hour is date_bin of one hour from a UTC midnight: integer arithmetic on the
-- timestamp, equal to date_trunc('hour', timestamp, 'UTC') before and after the origin,
-- without a per-row time zone lookup. Distinct users are found by hashing (hour, user)
-- pairs, not by sorting each hour's ids under the database collation; the fold orders
-- and deduplicates the ids it reads anyway.

CREATE OR REPLACE FUNCTION analytics_rollup_inserted_events()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH slices AS MATERIALIZED (
        SELECT date_bin('1 hour', timestamp, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS hour_start,
               event_name, user_id
        FROM inserted
    ), deltas AS (
        INSERT INTO event_count_deltas (bucket_start, event_name, event_count)
        SELECT hour_start, event_name, count(*)
        FROM slices
        GROUP BY 1, 2
    )
    INSERT INTO user_activity_pending (hour_start, user_ids)
    SELECT hour_start, array_agg(user_id)
    FROM (SELECT DISTINCT hour_start, user_id FROM slices WHERE user_id <> '') pairs
    GROUP BY 1;

    RETURN NULL;
END $$;
