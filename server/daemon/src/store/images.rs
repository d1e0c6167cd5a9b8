//! The `images` table: names (per tenant) of images the helper stores by digest.

use sandboxd_api::{Image, ImageConfig};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Store, StoreError};

/// An image row before insertion.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub tenant: String,
    pub name: String,
    pub digest: String,
    pub size_bytes: u64,
    pub archive_bytes: u64,
    pub entries: u64,
    pub format: String,
    pub layers: u32,
    pub created_at_ms: i64,
    pub config: ImageConfig,
}

/// The `config` column: a stored configuration the daemon cannot read is a corrupt row.
fn config_of(row: &SqliteRow) -> Result<ImageConfig, StoreError> {
    let text: String = row.try_get("config")?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
        id: row.try_get::<String, _>("name").unwrap_or_default(),
        what: format!("image config: {e}"),
    })
}

/// Sandboxes of the image's tenant whose spec names the image (any state: their upper layers
/// need the image until they are deleted).
const IN_USE: &str = "(SELECT COUNT(*) FROM sandboxes s
      WHERE s.tenant = images.tenant AND json_extract(s.spec, '$.rootfs.image') = images.name)";

fn image_row(row: &SqliteRow) -> Result<Image, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt {
        id: row.try_get::<String, _>("name").unwrap_or_default(),
        what: what.to_owned(),
    };
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let created_ms: i64 = row.try_get("created_at")?;
    Ok(Image {
        name: row.try_get("name")?,
        digest: format!("sha256:{}", row.try_get::<String, _>("digest")?),
        size_bytes: u(row.try_get("size_bytes")?),
        archive_bytes: u(row.try_get("archive_bytes")?),
        entries: u(row.try_get("entries")?),
        format: row.try_get("format")?,
        layers: u32::try_from(row.try_get::<i64, _>("layers")?).unwrap_or(0),
        created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(created_ms) * 1_000_000)
            .map_err(|_| corrupt("created_at out of range"))?,
        in_use_by: u(row.try_get("in_use")?),
        config: config_of(row)?,
    })
}

/// What a tenant's images take: names, and the sum of their stored sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageUsage {
    pub images: u64,
    pub bytes: u64,
}

async fn image_usage_in(
    conn: &mut sqlx::SqliteConnection,
    tenant: &str,
) -> Result<ImageUsage, StoreError> {
    let row =
        sqlx::query("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images WHERE tenant = ?")
            .bind(tenant)
            .fetch_one(conn)
            .await?;
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(ImageUsage {
        images: u(row.try_get(0)?),
        bytes: u(row.try_get(1)?),
    })
}

/// Why an image would take its tenant beyond its quota (`None` when it fits): the message names
/// the quota, its limit and the usage.
pub fn image_quota_refusal(
    tenant: &str,
    quota: &super::StoredQuota,
    usage: ImageUsage,
    new_bytes: u64,
) -> Option<String> {
    let limit = |v: Option<i64>| v.map(|n| u64::try_from(n).unwrap_or(0));
    if let Some(max) = limit(quota.max_images) {
        if usage.images >= max {
            return Some(format!(
                "quota max_images: tenant {tenant:?} may have at most {max} images and has {}",
                usage.images
            ));
        }
    }
    if let Some(max) = limit(quota.max_image_bytes) {
        if usage.bytes.saturating_add(new_bytes) > max {
            return Some(format!(
                "quota max_image_bytes: tenant {tenant:?} may store at most {max} bytes of \
                 images; {} are in use and this image needs {new_bytes}",
                usage.bytes
            ));
        }
    }
    None
}

impl Store {
    /// A tenant's image names and the sum of their sizes.
    pub async fn image_usage(&self, tenant: &str) -> Result<ImageUsage, StoreError> {
        let mut conn = self.reader.acquire().await?;
        image_usage_in(&mut conn, tenant).await
    }

    /// Insert an image name; `NameTaken` when the tenant has one of that name already,
    /// `QuotaExceeded` when it would take the tenant beyond its image quota (checked in the
    /// insert's transaction, on the single writer, so two imports cannot both pass).
    pub async fn insert_image(&self, new: &NewImage) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let quota = self.quota_in(&mut tx, &new.tenant).await?;
        let usage = image_usage_in(&mut tx, &new.tenant).await?;
        if let Some(why) = image_quota_refusal(&new.tenant, &quota, usage, new.size_bytes) {
            return Err(StoreError::QuotaExceeded(why));
        }
        let inserted = sqlx::query(
            "INSERT INTO images (tenant, name, digest, size_bytes, archive_bytes, entries, format,
                                 layers, created_at, config)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&new.tenant)
        .bind(&new.name)
        .bind(&new.digest)
        .bind(new.size_bytes as i64)
        .bind(new.archive_bytes as i64)
        .bind(new.entries as i64)
        .bind(&new.format)
        .bind(i64::from(new.layers))
        .bind(new.created_at_ms)
        .bind(
            serde_json::to_string(&new.config).map_err(|e| StoreError::Corrupt {
                id: new.name.clone(),
                what: format!("image config: {e}"),
            })?,
        )
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => Ok(tx.commit().await?),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::NameTaken),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn image(&self, tenant: &str, name: &str) -> Result<Option<Image>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT *, {IN_USE} AS in_use FROM images WHERE tenant = ? AND name = ?"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(image_row).transpose()
    }

    /// The digest (bare hex) of a tenant's image.
    pub async fn image_digest(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self.image_launch(tenant, name).await?.map(|(d, _)| d))
    }

    /// The digest (bare hex) and configuration of a tenant's image.
    pub async fn image_launch(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<(String, ImageConfig)>, StoreError> {
        let row =
            sqlx::query("SELECT name, digest, config FROM images WHERE tenant = ? AND name = ?")
                .bind(tenant)
                .bind(name)
                .fetch_optional(&self.reader)
                .await?;
        row.map(|r| Ok((r.try_get("digest")?, config_of(&r)?)))
            .transpose()
    }

    pub async fn images(&self, tenant: &str) -> Result<Vec<Image>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT *, {IN_USE} AS in_use FROM images WHERE tenant = ? ORDER BY name"
        ))
        .bind(tenant)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(image_row).collect()
    }

    /// Delete an image name unless a sandbox uses it. `Ok(None)`: no such image; `Ok(Some(n))`
    /// with n > 0: in use by n sandboxes, not deleted; `Ok(Some(0))`: deleted. The check and the
    /// delete are one statement, so no sandbox row can slip in between.
    pub async fn delete_image(&self, tenant: &str, name: &str) -> Result<Option<u64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {IN_USE} AS in_use FROM images WHERE tenant = ? AND name = ?"
        ))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let in_use = u64::try_from(row.try_get::<i64, _>("in_use")?).unwrap_or(0);
        if in_use > 0 {
            return Ok(Some(in_use));
        }
        sqlx::query("DELETE FROM images WHERE tenant = ? AND name = ?")
            .bind(tenant)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(0))
    }

    /// The digest of the image a sandbox's root filesystem comes from (`None` for the host
    /// root): the name in its stored spec, looked up among its tenant's images. An image cannot
    /// be deleted while a sandbox refers to it, so this stays what it was at create.
    pub async fn sandbox_image_digest(
        &self,
        id: Uuid,
    ) -> Result<Option<(String, ImageConfig)>, StoreError> {
        let row = sqlx::query(
            "SELECT i.name, i.digest, i.config FROM sandboxes s JOIN images i
               ON i.tenant = s.tenant AND i.name = json_extract(s.spec, '$.rootfs.image')
             WHERE s.id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| Ok((r.try_get("digest")?, config_of(&r)?)))
            .transpose()
    }

    /// Whether any image row (of any tenant) names this digest.
    pub async fn digest_referenced(&self, digest: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM images WHERE digest = ? LIMIT 1")
            .bind(digest)
            .fetch_optional(&self.writer)
            .await?;
        Ok(row.is_some())
    }
}
