-- The rollup insert trigger in one pass over the inserting statement's rows: one
-- statement (one executor start instead of two) reads the transition table once into a
-- materialized list of (UTC hour, name, user), then appends the events per (hour, name)
-- to event_count_deltas and the distinct users per hour to user_activity_pending.
--
-- The UTC hour is date_bin of one hour from a UTC midnight: plain integer arithmetic on
-- the timestamp, equal to date_trunc('hour', timestamp, 'UTC') before and after the
-- origin, without the per-row time zone lookup. Distinct users are found by hashing
-- (hour, user) pairs rather than sorting each hour's array. What is appended, and so what
-- the fold and the count queries read, is unchanged.

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
