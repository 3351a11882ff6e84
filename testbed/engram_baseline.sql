-- Engram's schema as of its 2026-06-02 baseline migration plus the 2026-06-03/04
-- additions: the "older" test-bed variant. Only the tables a recovery tool
-- touches, or that carry row-level security, are modelled; column names, types,
-- nullability and index names follow Engram's priv/repo/structure.sql.
-- Row-level security, ownership and grants are applied from schema.py.
-- @UUID_DEFAULT@ becomes uuidv7() on PostgreSQL 18+ and gen_random_uuid() before.

CREATE TABLE public.plans (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    name text NOT NULL,
    limits jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamp(0) without time zone NOT NULL,
    updated_at timestamp(0) without time zone NOT NULL
);
CREATE UNIQUE INDEX plans_name_index ON public.plans (name);

CREATE TABLE public.users (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    email text NOT NULL,
    display_name text,
    created_at timestamp(0) without time zone NOT NULL,
    updated_at timestamp(0) without time zone NOT NULL,
    external_id text,
    plan_id uuid REFERENCES public.plans (id),
    password_hash character varying(255),
    role character varying(255) NOT NULL DEFAULT 'member',
    encrypted_dek bytea,
    dek_version integer NOT NULL DEFAULT 1,
    key_provider character varying(255) NOT NULL DEFAULT 'local',
    dek_rotation_locked_at timestamp without time zone,
    normalized_email text,
    phone_verified_at timestamp without time zone,
    deleted_at timestamp without time zone,
    inactivity_warning_60_at timestamp without time zone,
    inactivity_warning_80_at timestamp without time zone,
    suspended_at timestamp with time zone,
    onboarding_profile jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE UNIQUE INDEX users_clerk_id_index ON public.users (external_id) WHERE external_id IS NOT NULL;
CREATE INDEX users_deleted_at_index ON public.users (deleted_at);
CREATE UNIQUE INDEX users_email_lower_index ON public.users (lower(email));
CREATE UNIQUE INDEX users_normalized_email_index ON public.users (normalized_email);
CREATE INDEX users_plan_id_index ON public.users (plan_id);

CREATE TABLE public.vaults (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    description text,
    slug text NOT NULL,
    client_id text,
    is_default boolean NOT NULL DEFAULT false,
    deleted_at timestamp(0) without time zone,
    created_at timestamp(0) without time zone NOT NULL,
    updated_at timestamp(0) without time zone NOT NULL,
    name_ciphertext bytea NOT NULL,
    name_nonce bytea NOT NULL,
    name_hmac bytea NOT NULL,
    dek_version integer NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX vaults_user_id_client_id_index ON public.vaults (user_id, client_id)
    WHERE client_id IS NOT NULL AND deleted_at IS NULL;
CREATE UNIQUE INDEX vaults_user_id_default_index ON public.vaults (user_id)
    WHERE is_default = true AND deleted_at IS NULL;
CREATE INDEX vaults_user_id_name_hmac_index ON public.vaults (user_id, name_hmac);
CREATE UNIQUE INDEX vaults_user_id_slug_index ON public.vaults (user_id, slug) WHERE deleted_at IS NULL;

CREATE TABLE public.notes (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id),
    version integer NOT NULL DEFAULT 1,
    content_hash text,
    mtime double precision,
    deleted_at timestamp without time zone,
    created_at timestamp without time zone NOT NULL,
    updated_at timestamp without time zone NOT NULL,
    embed_hash text,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    content_ciphertext bytea NOT NULL,
    content_nonce bytea NOT NULL,
    title_ciphertext bytea NOT NULL,
    title_nonce bytea NOT NULL,
    tags_ciphertext bytea NOT NULL,
    tags_nonce bytea NOT NULL,
    path_ciphertext bytea NOT NULL,
    path_nonce bytea NOT NULL,
    path_hmac bytea NOT NULL,
    folder_ciphertext bytea NOT NULL,
    folder_nonce bytea NOT NULL,
    folder_hmac bytea NOT NULL,
    tags_hmac bytea[] DEFAULT ARRAY[]::bytea[],
    dek_version integer NOT NULL DEFAULT 1
);
CREATE INDEX idx_notes_embed_pending ON public.notes (embed_hash)
    WHERE deleted_at IS NULL AND (embed_hash IS NULL OR embed_hash <> content_hash);
CREATE INDEX idx_notes_user_deleted ON public.notes (user_id, deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX idx_notes_user_updated ON public.notes (user_id, updated_at);
CREATE INDEX notes_tags_hmac_index ON public.notes USING gin (tags_hmac);
CREATE INDEX notes_user_id_vault_id_folder_hmac_index ON public.notes (user_id, vault_id, folder_hmac);
CREATE UNIQUE INDEX notes_user_id_vault_id_path_hmac_index ON public.notes (user_id, vault_id, path_hmac)
    WHERE deleted_at IS NULL;
CREATE INDEX notes_vault_id_index ON public.notes (vault_id);

CREATE TABLE public.chunks (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    note_id uuid NOT NULL REFERENCES public.notes (id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES public.users (id),
    "position" smallint NOT NULL,
    heading_path text,
    char_start integer NOT NULL,
    char_end integer NOT NULL,
    qdrant_point_id uuid NOT NULL,
    created_at timestamp(0) without time zone NOT NULL,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX chunks_note_id_position_index ON public.chunks (note_id, "position");
CREATE INDEX chunks_vault_id_index ON public.chunks (vault_id);
CREATE INDEX idx_chunks_note ON public.chunks (note_id);
CREATE INDEX idx_chunks_user ON public.chunks (user_id);

CREATE TABLE public.attachments (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id),
    mime_type text,
    size_bytes bigint,
    mtime double precision,
    deleted_at timestamp(0) without time zone,
    created_at timestamp(0) without time zone NOT NULL,
    updated_at timestamp(0) without time zone NOT NULL,
    content_hash text,
    storage_key character varying(255),
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    encryption_version integer NOT NULL DEFAULT 0,
    content_nonce bytea,
    path_ciphertext bytea NOT NULL,
    path_nonce bytea NOT NULL,
    path_hmac bytea NOT NULL,
    dek_version integer NOT NULL DEFAULT 1,
    dek_version_pending integer
);
CREATE UNIQUE INDEX attachments_user_id_vault_id_path_hmac_index ON public.attachments (user_id, vault_id, path_hmac)
    WHERE deleted_at IS NULL;
CREATE INDEX attachments_vault_id_index ON public.attachments (vault_id);
CREATE INDEX idx_attachments_user ON public.attachments (user_id);

-- Deliberately not tenant-scoped in Engram: the database storage backend scopes
-- by key prefix, exactly like S3.
CREATE TABLE public.storage_objects (
    storage_key text PRIMARY KEY,
    data bytea NOT NULL,
    byte_size bigint NOT NULL,
    inserted_at timestamp without time zone NOT NULL
);

CREATE TABLE public.system_canaries (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    wrapped_dek bytea NOT NULL,
    dek_sha256 bytea NOT NULL,
    inserted_at timestamp without time zone NOT NULL,
    updated_at timestamp without time zone NOT NULL
);
CREATE INDEX system_canaries_inserted_at_index ON public.system_canaries (inserted_at);

CREATE TABLE public.refresh_tokens (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    token_hash character varying(255) NOT NULL,
    family_id character varying(255) NOT NULL,
    expires_at timestamp(0) without time zone NOT NULL,
    revoked_at timestamp(0) without time zone,
    created_at timestamp(0) without time zone NOT NULL
);
CREATE INDEX refresh_tokens_family_id_index ON public.refresh_tokens (family_id);
CREATE UNIQUE INDEX refresh_tokens_token_hash_index ON public.refresh_tokens (token_hash);
CREATE INDEX refresh_tokens_user_id_index ON public.refresh_tokens (user_id);

CREATE TABLE public.device_refresh_tokens (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    token_hash character varying(255) NOT NULL,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    expires_at timestamp(0) without time zone NOT NULL,
    revoked_at timestamp(0) without time zone,
    inserted_at timestamp(0) without time zone NOT NULL,
    family_id uuid,
    CONSTRAINT device_refresh_tokens_family_id_not_null CHECK (family_id IS NOT NULL)
);
CREATE INDEX device_refresh_tokens_family_id_index ON public.device_refresh_tokens (family_id);
CREATE UNIQUE INDEX device_refresh_tokens_token_hash_index ON public.device_refresh_tokens (token_hash);
CREATE INDEX device_refresh_tokens_user_id_index ON public.device_refresh_tokens (user_id);
CREATE INDEX device_refresh_tokens_vault_id_index ON public.device_refresh_tokens (vault_id);

CREATE TABLE public.oauth_clients (
    client_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_secret_hash character varying(255),
    redirect_uris character varying(255)[] NOT NULL DEFAULT ARRAY[]::character varying[],
    client_name character varying(255),
    scope character varying(255),
    grant_types character varying(255)[] NOT NULL
        DEFAULT ARRAY['authorization_code'::character varying, 'refresh_token'::character varying],
    response_types character varying(255)[] NOT NULL DEFAULT ARRAY['code'::character varying],
    token_endpoint_auth_method character varying(255) NOT NULL DEFAULT 'none',
    software_id character varying(255),
    software_version character varying(255),
    inserted_at timestamp without time zone NOT NULL,
    updated_at timestamp without time zone NOT NULL,
    kind character varying(255) NOT NULL DEFAULT 'mcp',
    first_user_agent text,
    first_ip text,
    logo_uri text,
    tos_uri text,
    policy_uri text,
    CONSTRAINT oauth_clients_kind_check CHECK (kind IN ('mcp', 'obsidian'))
);

CREATE TABLE public.oauth_authorization_codes (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    code_hash character varying(255) NOT NULL,
    client_id uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    redirect_uri character varying(255) NOT NULL,
    code_challenge character varying(255) NOT NULL,
    code_challenge_method character varying(255) NOT NULL DEFAULT 'S256',
    scope character varying(255),
    vault_id uuid REFERENCES public.vaults (id) ON DELETE CASCADE,
    state character varying(255),
    expires_at timestamp(0) without time zone NOT NULL,
    consumed_at timestamp(0) without time zone,
    inserted_at timestamp without time zone NOT NULL
);
CREATE INDEX oauth_authorization_codes_client_id_index ON public.oauth_authorization_codes (client_id);
CREATE UNIQUE INDEX oauth_authorization_codes_code_hash_index ON public.oauth_authorization_codes (code_hash);
CREATE INDEX oauth_authorization_codes_expires_at_index ON public.oauth_authorization_codes (expires_at);
CREATE INDEX oauth_authorization_codes_user_id_index ON public.oauth_authorization_codes (user_id);
CREATE INDEX oauth_authorization_codes_vault_id_index ON public.oauth_authorization_codes (vault_id);

CREATE TABLE public.oauth_refresh_tokens (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    token_hash character varying(255) NOT NULL,
    family_id uuid NOT NULL,
    client_id uuid NOT NULL,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    vault_id uuid REFERENCES public.vaults (id) ON DELETE CASCADE,
    scope character varying(255),
    expires_at timestamp(0) without time zone NOT NULL,
    revoked_at timestamp(0) without time zone,
    consumed_at timestamp(0) without time zone,
    inserted_at timestamp without time zone NOT NULL,
    last_used_at timestamp without time zone,
    last_used_ip text
);
CREATE INDEX idx_oauth_refresh_tokens_user_client_active ON public.oauth_refresh_tokens (user_id, client_id)
    WHERE revoked_at IS NULL AND consumed_at IS NULL;
CREATE INDEX oauth_refresh_tokens_expires_at_index ON public.oauth_refresh_tokens (expires_at);
CREATE INDEX oauth_refresh_tokens_family_id_index ON public.oauth_refresh_tokens (family_id);
CREATE UNIQUE INDEX oauth_refresh_tokens_token_hash_index ON public.oauth_refresh_tokens (token_hash);
CREATE INDEX oauth_refresh_tokens_user_id_index ON public.oauth_refresh_tokens (user_id);
CREATE INDEX oauth_refresh_tokens_vault_id_index ON public.oauth_refresh_tokens (vault_id);

-- A revoked API key is a deleted row, so a restore brings it back to life.
CREATE TABLE public.api_keys (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    key_hash text NOT NULL,
    name text,
    last_used timestamp(0) without time zone,
    created_at timestamp(0) without time zone NOT NULL
);
CREATE INDEX api_keys_user_id_index ON public.api_keys (user_id);
CREATE UNIQUE INDEX idx_api_keys_hash ON public.api_keys (key_hash);

CREATE TABLE public.api_key_vaults (
    api_key_id uuid NOT NULL REFERENCES public.api_keys (id) ON DELETE CASCADE,
    vault_id uuid NOT NULL REFERENCES public.vaults (id) ON DELETE CASCADE,
    PRIMARY KEY (api_key_id, vault_id)
);
CREATE INDEX api_key_vaults_vault_id_index ON public.api_key_vaults (vault_id);

CREATE TABLE public.user_agreements (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    document text NOT NULL,
    version text NOT NULL,
    accepted_at timestamp(0) without time zone NOT NULL DEFAULT now(),
    ip_address text,
    user_agent text,
    content_hash text
);
CREATE UNIQUE INDEX user_agreements_user_document_version_unique ON public.user_agreements (user_id, document, version);
CREATE INDEX user_agreements_user_id_document_accepted_at_index
    ON public.user_agreements (user_id, document, accepted_at);

CREATE TABLE public.onboarding_actions (
    id uuid PRIMARY KEY DEFAULT @UUID_DEFAULT@,
    user_id uuid NOT NULL REFERENCES public.users (id) ON DELETE CASCADE,
    action character varying(255) NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    inserted_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX onboarding_actions_user_id_action_index ON public.onboarding_actions (user_id, action);
