-- Idempotency keys belong to their sender: a key is (scope, user_id, insert_id), where
-- scope is the caller's verified mTLS identity ('' without mTLS: one scope shared by
-- every caller) and user_id the event's user ('' for anonymous events). Two services or
-- two users that send the same insert_id no longer collide, and no caller can suppress
-- another caller's events by guessing its keys.
-- Existing keys move to the shared scope, with the user of the event they point at.
ALTER TABLE event_insert_ids
    ADD COLUMN scope TEXT NOT NULL DEFAULT '',
    ADD COLUMN user_id TEXT NOT NULL DEFAULT '';

UPDATE event_insert_ids AS keys
SET user_id = coalesce((SELECT events.user_id FROM events WHERE events.id = keys.event_id LIMIT 1), '');

ALTER TABLE event_insert_ids
    DROP CONSTRAINT event_insert_ids_pkey,
    ADD CONSTRAINT event_insert_ids_pkey PRIMARY KEY (scope, user_id, insert_id);
