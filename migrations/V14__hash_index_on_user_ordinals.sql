-- A hash index on user_ordinals.user_id, for the one lookup counts make per user.
--
-- GetUserCount maps the users not folded yet (the pending pairs and the raw events of the
-- partial edge hours, a few thousand ids) to their ordinals, one probe per id
-- (src/repository/postgres/rollups.rs). A hash probe costs about a third of a B-tree
-- descent over text keys: 4,246 probes took 4.5 ms against 14 ms through the primary key
-- (10M events, 100k users; README "Benchmarks: counts"). The primary key stays: it is
-- the uniqueness the fold's INSERT .. ON CONFLICT relies on.
CREATE INDEX user_ordinals_user_id_hash ON user_ordinals USING hash (user_id);
