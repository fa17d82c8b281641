-- Idempotency keys of TrackEvent/TrackEvents: one row per key, pointing at the event it
-- stored. A key belongs to its sender: it is (scope, user_id, insert_id), where scope is
-- the caller's verified mTLS identity ('' without mTLS: one scope shared by every caller)
-- and user_id the event's user ('' for anonymous events). Two services or two users that
-- send the same insert_id do not collide, and no caller can suppress another caller's
-- events by guessing its keys.
--
-- A separate table, not a unique index on events: events is range-partitioned by
-- timestamp (V1), and a unique constraint on a partitioned table must include the
-- partition key, which an insert_id lookup lacks.
-- Rows older than IDEMPOTENCY_WINDOW_DAYS are expired by the service (created_at index).
CREATE TABLE event_insert_ids (
    scope TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    insert_id VARCHAR(255) NOT NULL,
    event_id UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    CONSTRAINT event_insert_ids_pkey PRIMARY KEY (scope, user_id, insert_id)
);

CREATE INDEX idx_event_insert_ids_created_at ON event_insert_ids (created_at);
