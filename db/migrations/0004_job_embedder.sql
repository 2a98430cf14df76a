-- The embedder that produced an event's current vectors. When the effective embedder
-- changes (an OpenAI key appears, the model or dimensions change), the worker re-queues
-- the whole event so that every vector again comes from one embedder.
ALTER TABLE matchmaking_jobs ADD COLUMN embedder_key text;
