-- Oban's tables as `Oban.Migrations` leaves them at version 14 (Postgres engine),
-- written out as the end state of migrations V01..V14 rather than replayed:
-- V01 table and enum, V02 length checks, V03 attempted_by, V08 priority/tags/
-- discarded_at and the state/queue/priority index, V09 meta/cancelled_at,
-- V10 defaults, checks and GIN indexes, V11 oban_peers (unlogged by default),
-- V12 non_negative_priority NOT VALID and no notify trigger, V13 the
-- cancelled_at/discarded_at indexes, V14 'suspended'. Oban records the version
-- it reached in the table comment; tools read that comment.

CREATE TYPE public.oban_job_state AS ENUM (
    'available', 'suspended', 'scheduled', 'executing',
    'retryable', 'completed', 'discarded', 'cancelled'
);

CREATE TABLE public.oban_jobs (
    id bigserial PRIMARY KEY,
    state public.oban_job_state NOT NULL DEFAULT 'available',
    queue text NOT NULL DEFAULT 'default',
    worker text NOT NULL,
    args jsonb NOT NULL DEFAULT '{}'::jsonb,
    errors jsonb[] NOT NULL DEFAULT ARRAY[]::jsonb[],
    attempt integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 20,
    inserted_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    scheduled_at timestamp without time zone NOT NULL DEFAULT timezone('UTC', now()),
    attempted_at timestamp without time zone,
    completed_at timestamp without time zone,
    attempted_by text[],
    discarded_at timestamp without time zone,
    priority integer NOT NULL DEFAULT 0,
    tags text[] DEFAULT ARRAY[]::text[],
    meta jsonb DEFAULT '{}'::jsonb,
    cancelled_at timestamp without time zone,
    CONSTRAINT worker_length CHECK (char_length(worker) > 0 AND char_length(worker) < 128),
    CONSTRAINT queue_length CHECK (char_length(queue) > 0 AND char_length(queue) < 128),
    CONSTRAINT positive_max_attempts CHECK (max_attempts > 0),
    CONSTRAINT attempt_range CHECK (attempt BETWEEN 0 AND max_attempts)
);

ALTER TABLE public.oban_jobs ADD CONSTRAINT non_negative_priority CHECK (priority >= 0) NOT VALID;

CREATE INDEX oban_jobs_state_queue_priority_scheduled_at_id_index
    ON public.oban_jobs (state, queue, priority, scheduled_at, id);
CREATE INDEX oban_jobs_args_index ON public.oban_jobs USING gin (args);
CREATE INDEX oban_jobs_meta_index ON public.oban_jobs USING gin (meta);
CREATE INDEX oban_jobs_state_cancelled_at_index ON public.oban_jobs (state, cancelled_at);
CREATE INDEX oban_jobs_state_discarded_at_index ON public.oban_jobs (state, discarded_at);

COMMENT ON TABLE public.oban_jobs IS '14';

CREATE UNLOGGED TABLE public.oban_peers (
    name text PRIMARY KEY,
    node text NOT NULL,
    started_at timestamp without time zone NOT NULL,
    expires_at timestamp without time zone NOT NULL
);
