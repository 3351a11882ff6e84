-- NOT upstream Engram: a synthetic release after 0.18.1 (made-up versions 20260827000000..20260831030000),
-- so the tools are tested against a schema that grew columns and indexes they must detect.

-- 20260827000000: embed_hash means "content indexed", dense_indexed_hash means
-- "has dense vectors"; a reindex must clear both or EmbedNote skips the note.
ALTER TABLE public.notes ADD COLUMN dense_indexed_hash text;

-- 20260828000000
CREATE INDEX idx_notes_user_created_rank ON public.notes (user_id, created_at, id)
    WHERE kind = 'note' AND deleted_at IS NULL;

-- 20260831030000: OrphanSweep's point pass probes chunks by Qdrant point id.
CREATE INDEX chunks_qdrant_point_id_index ON public.chunks (qdrant_point_id);
