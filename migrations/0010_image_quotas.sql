-- Image quotas (issue 12): how many image names a tenant may have, and how many bytes their
-- unpacked contents may take together (each name counts its image's full size, even when another
-- name or tenant stores the same content). NULL means unlimited.
ALTER TABLE quotas ADD COLUMN max_images INTEGER NULL;
ALTER TABLE quotas ADD COLUMN max_image_bytes INTEGER NULL;
