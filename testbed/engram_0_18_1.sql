-- Engram's migrations from 20260605000353 to 20260816070000 (release 0.18.1),
-- applied on top of engram_baseline.sql, restricted to the modelled tables.
-- Applied as ALTERs rather than a fresh CREATE so the resulting catalogue looks
-- like a database that really lived through the upgrades (column order,
-- nullable-then-NOT-NULL columns). CONCURRENTLY is dropped: nothing else is
-- connected while the test bed builds.

-- 20260605000353 empty folders: a notes row may be a folder marker.
ALTER TABLE public.notes ADD COLUMN kind text NOT NULL DEFAULT 'note';
ALTER TABLE public.notes
    ALTER COLUMN content_ciphertext DROP NOT NULL,
    ALTER COLUMN content_nonce DROP NOT NULL,
    ALTER COLUMN title_ciphertext DROP NOT NULL,
    ALTER COLUMN title_nonce DROP NOT NULL,
    ALTER COLUMN tags_ciphertext DROP NOT NULL,
    ALTER COLUMN tags_nonce DROP NOT NULL,
    ALTER COLUMN path_ciphertext DROP NOT NULL,
    ALTER COLUMN path_nonce DROP NOT NULL,
    ALTER COLUMN path_hmac DROP NOT NULL;
ALTER TABLE public.notes ADD CONSTRAINT notes_kind_shape_check CHECK (
    (kind = 'note' AND path_hmac IS NOT NULL AND content_ciphertext IS NOT NULL
        AND title_ciphertext IS NOT NULL AND tags_ciphertext IS NOT NULL AND folder_hmac IS NOT NULL)
    OR
    (kind = 'folder' AND path_hmac IS NULL AND content_ciphertext IS NULL
        AND title_ciphertext IS NULL AND tags_ciphertext IS NULL AND folder_hmac IS NOT NULL)
);
CREATE UNIQUE INDEX notes_user_vault_path_v2 ON public.notes (user_id, vault_id, path_hmac)
    WHERE deleted_at IS NULL AND kind = 'note';
CREATE UNIQUE INDEX notes_user_vault_folder_marker ON public.notes (user_id, vault_id, folder_hmac)
    WHERE deleted_at IS NULL AND kind = 'folder';
DROP INDEX public.idx_notes_embed_pending;
CREATE INDEX idx_notes_embed_pending ON public.notes (embed_hash)
    WHERE deleted_at IS NULL AND kind = 'note' AND (embed_hash IS NULL OR embed_hash <> content_hash);
-- 20260605014354
DROP INDEX public.notes_user_id_vault_id_path_hmac_index;

-- 20260607072745
ALTER TABLE public.users ADD COLUMN free_tier_accepted_at timestamp with time zone;

-- 20260615120000
ALTER TABLE public.chunks ADD COLUMN token_count bigint;

-- 20260616120000 sync change log: the vault's counter and each row's position in it.
ALTER TABLE public.vaults ADD COLUMN change_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE public.notes ADD COLUMN seq bigint;
ALTER TABLE public.attachments ADD COLUMN seq bigint;
ALTER TABLE public.vaults SET (fillfactor = 80);
CREATE INDEX notes_vault_id_seq_id_index ON public.notes (vault_id, seq, id);
CREATE INDEX attachments_vault_id_seq_id_index ON public.attachments (vault_id, seq, id);

-- 20260616130000
CREATE TABLE public.vault_device_cursors (
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    device_id text NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,
    last_seen_at timestamp with time zone NOT NULL,
    PRIMARY KEY (vault_id, device_id)
);
ALTER TABLE public.attachments ADD COLUMN version bigint NOT NULL DEFAULT 1;

-- 20260624000000 poison cooldown of the embed pipeline.
ALTER TABLE public.notes ADD COLUMN embed_retry_after timestamp with time zone;

-- 20260625130000, 20260625140000
ALTER TABLE public.notes ADD COLUMN crdt_state_ciphertext bytea, ADD COLUMN crdt_state_nonce bytea;
CREATE TABLE public.crdt_update_log (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    note_id uuid NOT NULL REFERENCES public.notes (id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    update_ciphertext bytea NOT NULL,
    update_nonce bytea NOT NULL,
    inserted_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX crdt_update_log_note_id_inserted_at_index ON public.crdt_update_log (note_id, inserted_at);
CREATE INDEX crdt_update_log_user_id_index ON public.crdt_update_log (user_id);
CREATE INDEX crdt_update_log_vault_id_index ON public.crdt_update_log (vault_id);

-- 20260629240000
ALTER TABLE public.user_agreements ALTER COLUMN accepted_at SET DEFAULT timezone('UTC', now());

-- 20260702110000 lets a reindex find an incomplete EmbedNote job for a note without a scan.
CREATE INDEX oban_jobs_embed_note_note_id_index ON public.oban_jobs ((args ->> 'note_id'))
    WHERE worker = 'Engram.Workers.EmbedNote'
        AND state IN ('scheduled', 'available', 'executing', 'retryable');

-- 20260702120000 (PostgreSQL 18 spells it as a named NOT NULL constraint; same effect).
ALTER TABLE public.notes ALTER COLUMN seq SET NOT NULL;
ALTER TABLE public.attachments ALTER COLUMN seq SET NOT NULL;

-- 20260702130000
CREATE TABLE public.idempotency_keys (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    key uuid NOT NULL,
    status integer NOT NULL,
    response_ciphertext bytea NOT NULL,
    response_nonce bytea NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    inserted_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX idempotency_keys_user_id_key_index ON public.idempotency_keys (user_id, key);
CREATE INDEX idempotency_keys_expires_at_index ON public.idempotency_keys (expires_at);

-- 20260702150000
DROP INDEX public.idx_chunks_note;
DROP INDEX public.notes_vault_id_index;
DROP INDEX public.attachments_vault_id_index;

-- 20260703100000
ALTER TABLE public.notes
    ADD COLUMN fm_timestamp timestamp with time zone,
    ADD COLUMN fm_created timestamp with time zone,
    ADD COLUMN type_ciphertext bytea,
    ADD COLUMN type_nonce bytea,
    ADD COLUMN type_hmac bytea,
    ADD COLUMN description_ciphertext bytea,
    ADD COLUMN description_nonce bytea,
    ADD COLUMN resource_ciphertext bytea,
    ADD COLUMN resource_nonce bytea;
CREATE INDEX notes_user_id_vault_id_fm_timestamp_index ON public.notes (user_id, vault_id, fm_timestamp);
CREATE INDEX notes_user_id_vault_id_fm_created_index ON public.notes (user_id, vault_id, fm_created);
CREATE INDEX notes_user_id_vault_id_type_hmac_index ON public.notes (user_id, vault_id, type_hmac);

-- 20260710190000 a snapshot write must invalidate the cached CRDT head.
ALTER TABLE public.notes ADD COLUMN crdt_head text;
CREATE FUNCTION public.notes_null_crdt_head() RETURNS trigger
    LANGUAGE plpgsql SET search_path = ''
    AS $$
BEGIN
  NEW.crdt_head := NULL;
  RETURN NEW;
END;
$$;
CREATE TRIGGER notes_crdt_head_invalidate
    BEFORE UPDATE OF crdt_state_ciphertext ON public.notes
    FOR EACH ROW
    WHEN (NEW.crdt_state_ciphertext IS DISTINCT FROM OLD.crdt_state_ciphertext)
    EXECUTE FUNCTION public.notes_null_crdt_head();

-- 20260712120000
ALTER TABLE public.notes ADD COLUMN parse_status text NOT NULL DEFAULT 'ok', ADD COLUMN parse_reason jsonb;

-- 20260730180000
ALTER TABLE public.oauth_authorization_codes ALTER COLUMN state TYPE text, ALTER COLUMN redirect_uri TYPE text;
ALTER TABLE public.oauth_clients ALTER COLUMN redirect_uris DROP DEFAULT;
ALTER TABLE public.oauth_clients ALTER COLUMN redirect_uris TYPE text[];
ALTER TABLE public.oauth_clients ALTER COLUMN redirect_uris SET DEFAULT ARRAY[]::text[];

-- 20260731021500
ALTER TABLE public.oauth_clients ADD COLUMN cimd_url text, ADD COLUMN cimd_fetched_at timestamp with time zone;
CREATE UNIQUE INDEX oauth_clients_cimd_url_index ON public.oauth_clients (cimd_url) WHERE cimd_url IS NOT NULL;

-- 20260802020000
ALTER TABLE public.oauth_refresh_tokens ADD COLUMN redirect_uri text;

-- 20260804025327
CREATE TABLE public.note_links (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    source_note_id uuid NOT NULL REFERENCES public.notes (id) ON DELETE CASCADE,
    target_note_id uuid REFERENCES public.notes (id) ON DELETE SET NULL,
    target_attachment_id uuid REFERENCES public.attachments (id) ON DELETE SET NULL,
    target_text_ciphertext bytea NOT NULL,
    target_text_nonce bytea NOT NULL,
    target_basename_hmac bytea NOT NULL,
    link_type text NOT NULL,
    alias_ciphertext bytea,
    alias_nonce bytea,
    anchor_ciphertext bytea,
    anchor_nonce bytea,
    "position" integer NOT NULL,
    dek_version integer NOT NULL DEFAULT 2,
    inserted_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT note_links_link_type_check CHECK (link_type IN ('wikilink', 'embed'))
);
CREATE UNIQUE INDEX note_links_source_note_id_position_index ON public.note_links (source_note_id, "position");
CREATE INDEX note_links_user_id_vault_id_source_note_id_index
    ON public.note_links (user_id, vault_id, source_note_id);
CREATE INDEX note_links_target_note_id_user_id_vault_id_index
    ON public.note_links (target_note_id, user_id, vault_id);
CREATE INDEX note_links_target_attachment_id_user_id_vault_id_index
    ON public.note_links (target_attachment_id, user_id, vault_id);
CREATE INDEX note_links_vault_id_index ON public.note_links (vault_id);
CREATE INDEX note_links_basename_idx ON public.note_links (user_id, vault_id, target_basename_hmac);

-- 20260804025328, 20260804025329
ALTER TABLE public.notes ADD COLUMN basename_hmac bytea;
ALTER TABLE public.attachments ADD COLUMN basename_hmac bytea;
CREATE INDEX notes_user_id_vault_id_basename_hmac_index ON public.notes (user_id, vault_id, basename_hmac)
    WHERE deleted_at IS NULL;
CREATE INDEX attachments_user_id_vault_id_basename_hmac_index
    ON public.attachments (user_id, vault_id, basename_hmac) WHERE deleted_at IS NULL;

-- 20260805230858
CREATE INDEX oban_jobs_rewrite_note_links_old_basename_hmac_index ON public.oban_jobs ((args ->> 'old_basename_hmac'))
    WHERE worker = 'Engram.Workers.RewriteNoteLinks';

-- 20260815060000, 20260816070000
CREATE TABLE public.vault_index_states (
    vault_id uuid PRIMARY KEY REFERENCES public.vaults (id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    state_ciphertext bytea NOT NULL,
    state_nonce bytea NOT NULL,
    dek_version integer NOT NULL DEFAULT 2,
    inserted_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL
);
CREATE INDEX vault_index_states_user_id_index ON public.vault_index_states (user_id);
CREATE TABLE public.vault_index_update_log (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    update_ciphertext bytea NOT NULL,
    update_nonce bytea NOT NULL,
    dek_version integer NOT NULL DEFAULT 2,
    inserted_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX vault_index_update_log_vault_id_inserted_at_id_index
    ON public.vault_index_update_log (vault_id, inserted_at, id);
CREATE INDEX vault_index_update_log_user_id_index ON public.vault_index_update_log (user_id);
