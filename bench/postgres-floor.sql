-- The Postgres floor for the durable scenario (pgbench script, run by scripts/bench.sh floor).
-- One transaction = one append batch of :batch messages, with the statements cochat's Postgres
-- store sends for a batch of posts (src/store/postgres.rs, `append`): lock the room row, look
-- up earlier sends with the same client ids, insert the `messages` rows, insert the `events`
-- rows (payload cast to jsonb), move the room's head, commit. Ids, texts and payloads are built
-- here in SQL (cochat binds them as arrays), so this costs Postgres a little more, not less.
-- Postgres alone on the machine, nothing else running: no server or generator can get more
-- acked messages per second out of this schema here.
SELECT nextval('floor_batches') AS b \gset
\set room random(1, 64)
BEGIN;
SELECT id, last_seq FROM rooms WHERE id = ANY(ARRAY['r_floor_' || :room]) ORDER BY id FOR UPDATE;
SELECT m.room_id, m.author_id, m.client_msg_id, m.id, m.seq
  FROM UNNEST(array_fill('r_floor_' || :room, ARRAY[:batch]), array_fill('u_floor'::text, ARRAY[:batch]),
              ARRAY(SELECT 'c' || (:b * :batch + i) FROM generate_series(1, :batch) i))
       AS k(room_id, author_id, client_msg_id)
  JOIN messages m USING (room_id, author_id, client_msg_id);
INSERT INTO messages (id, room_id, seq, author_id, author_name, author_kind, client_msg_id, text, reply_to, created_at)
  SELECT 'm_' || md5((:b * :batch + i)::text), 'r_floor_' || :room, :b * :batch + i, 'u_floor', 'Floor', 'user',
         'c' || (:b * :batch + i), repeat('x', 100), NULL, 1795000000000
  FROM generate_series(1, :batch) i;
INSERT INTO events (room_id, seq, kind, message_id, payload, created_at)
  SELECT 'r_floor_' || :room, :b * :batch + i, 'message.created', 'm_' || md5((:b * :batch + i)::text),
         ('{"type":"message.created","message":{"id":"m_' || md5((:b * :batch + i)::text)
          || '","room":"r_floor_' || :room || '","seq":' || (:b * :batch + i)
          || ',"author":{"id":"u_floor","name":"Floor","kind":"user"},"text":"' || repeat('x', 100)
          || '","created_at":1795000000000}}')::jsonb,
         1795000000000
  FROM generate_series(1, :batch) i;
UPDATE rooms SET last_seq = :b * :batch + :batch WHERE id = 'r_floor_' || :room;
COMMIT;
