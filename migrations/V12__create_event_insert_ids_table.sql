-- Idempotency keys of TrackEvent/TrackEvents: one row per client-supplied insert_id,
-- pointing at the event it stored. A separate table, not a unique index on events:
-- events is range-partitioned by timestamp (V10), and a unique constraint on a
-- partitioned table must include the partition key, which an insert_id lookup lacks.
-- Rows older than IDEMPOTENCY_WINDOW_DAYS are expired by the service (created_at index).
-- V12, after the partitioning migrations V10/V11, so deployed databases apply it in order.
CREATE TABLE IF NOT EXISTS event_insert_ids (
    insert_id VARCHAR(255) PRIMARY KEY,
    event_id UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE INDEX IF NOT EXISTS idx_event_insert_ids_created_at ON event_insert_ids(created_at);
