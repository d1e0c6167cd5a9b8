-- Image configurations (issue 17): what a Docker or OCI image's config says about running it
-- (`Env`, `Entrypoint`, `Cmd`, `WorkingDir`, `User`), as the JSON of the API's `ImageConfig`.
-- Images imported before this keep `{}`: no configuration.
ALTER TABLE images ADD COLUMN config TEXT NOT NULL DEFAULT '{}';
