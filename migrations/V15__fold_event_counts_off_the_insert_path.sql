-- Issue 4, ingestion cost: the insert trigger no longer upserts the count rollups. Upserts
-- of the current hour's rows made every concurrent insert wait for the previous one's
-- commit (they lock the same rows) and cost ingestion about a third of its throughput.
-- Now the trigger only appends, like the pending users of V13:
--   event_count_deltas: events per (UTC hour, name) of each inserting statement.
-- `serve` folds the deltas into event_counts_hourly, event_counts_daily and
-- event_totals_hourly about once a second, in the transaction that folds the user pairs
-- and deletes what it folded (src/repository/postgres/fold.rs). Count queries read
-- the rollups and the deltas in one snapshot, so they stay exact however far the fold lags.

CREATE TABLE event_count_deltas (
    bucket_start TIMESTAMPTZ NOT NULL,
    event_name VARCHAR(255) NOT NULL,
    event_count BIGINT NOT NULL
);
CREATE INDEX idx_event_count_deltas_bucket ON event_count_deltas (bucket_start);

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
