//! The recommender's model directory (see `models/build_recommender.py`): `model.toml`, the
//! catalogue, users, training histories and the feature matrices, read into plain Rust values
//! that every engine thread shares. The TorchScript modules are loaded per engine thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use marquee_core::model::Instance;
use serde::Deserialize;

/// Errors loading the model directory; each names the file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{path}`: {message}")]
    File { path: PathBuf, message: String },
    #[error("`{path}`: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> LoadError {
    LoadError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// `[recommender]` of `model.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct RecommenderSpec {
    /// D: output size of both towers (L2-normalised).
    pub embedding_dim: usize,
    /// H: how many history items (newest last) the user tower reads.
    pub history_length: usize,
    pub num_items: usize,
    pub num_users: usize,
    /// Genre names in the column order of every genre vector.
    pub genres: Vec<String>,
    /// Column names of `user_features.npy`.
    pub user_feature_names: Vec<String>,
    /// Column names of `item_features.npy`.
    pub item_feature_names: Vec<String>,
    /// Share of the catalogue counted as long tail (by training popularity).
    #[serde(default)]
    pub long_tail_share: f64,
}

#[derive(Debug, Deserialize)]
struct ModelToml {
    #[serde(default)]
    kind: String,
    recommender: RecommenderSpec,
    #[serde(default)]
    instance: Instance,
}

/// One catalogue item. Genres are a bitmask over [`RecommenderSpec::genres`] (at most 64).
#[derive(Debug, Clone, Default)]
pub struct Item {
    pub item_id: i64,
    pub title: String,
    /// 0 when unknown.
    pub year: i32,
    pub genres: u64,
    pub popularity: u64,
    pub long_tail: bool,
}

/// The catalogue: `items[0]` is the padding row, real items are `1..items.len()`.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub items: Vec<Item>,
    pub by_id: HashMap<i64, u32>,
    pub genre_names: Vec<String>,
}

impl Catalog {
    /// Number of real items (without the padding row).
    pub fn len(&self) -> usize {
        self.items.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index of a catalogue item id.
    pub fn index_of(&self, item_id: i64) -> Option<u32> {
        self.by_id.get(&item_id).copied()
    }

    /// The bit of a genre name.
    pub fn genre_bit(&self, name: &str) -> Option<u64> {
        self.genre_names
            .iter()
            .position(|g| g == name)
            .map(|i| 1u64 << i)
    }

    /// The names of a genre bitmask.
    pub fn genre_list(&self, mask: u64) -> Vec<String> {
        (0..self.genre_names.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| self.genre_names[i].clone())
            .collect()
    }
}

/// A dense row-major f32 matrix.
#[derive(Debug, Clone, Default)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Reads a 2-D float32 `.npy` file.
    pub fn read_npy(path: &Path) -> Result<Self, LoadError> {
        let t = tch::Tensor::read_npy(path).map_err(|e| file_err(path, e))?;
        let size = t.size();
        if size.len() != 2 || t.kind() != tch::Kind::Float {
            return Err(invalid(
                path,
                format!(
                    "expected a 2-D float32 array, got shape {size:?} of {:?}",
                    t.kind()
                ),
            ));
        }
        let data = Vec::<f32>::try_from(t.flatten(0, -1)).map_err(|e| file_err(path, e))?;
        Ok(Self {
            rows: size[0] as usize,
            cols: size[1] as usize,
            data,
        })
    }
}

/// `[[item_index, unix_timestamp], ...]` per user index, oldest first.
pub type Histories = HashMap<u32, Vec<(u32, i64)>>;

/// Everything the service reads from the model directory, except the TorchScript modules.
#[derive(Debug, Clone)]
pub struct ModelData {
    pub dir: PathBuf,
    /// The version directory served (the highest number).
    pub version: String,
    pub spec: RecommenderSpec,
    /// `[instance]` of `model.toml`: the same keys as every model kind (lanes are engine workers).
    pub instance: Instance,
    pub catalog: Catalog,
    /// User id → user index (1..=num_users).
    pub users: HashMap<i64, u32>,
    /// Training histories by user index.
    pub histories: Histories,
    pub item_features: Matrix,
    pub user_features: Matrix,
    pub title_embeddings: Matrix,
}

#[derive(Deserialize)]
struct CatalogJson {
    items: Vec<CatalogItemJson>,
}

#[derive(Deserialize)]
struct CatalogItemJson {
    index: u32,
    item_id: i64,
    title: String,
    #[serde(default)]
    year: Option<i32>,
    #[serde(default)]
    genres: Vec<String>,
    #[serde(default)]
    popularity: u64,
    #[serde(default)]
    long_tail: bool,
}

#[derive(Deserialize)]
struct UsersJson {
    users: Vec<UserJson>,
}

#[derive(Deserialize)]
struct UserJson {
    index: u32,
    user_id: i64,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(path, e.to_string()))
}

/// Reads `histories.json` or `holdout.json`.
pub fn read_histories(path: &Path) -> Result<Histories, LoadError> {
    let raw: HashMap<String, Vec<(u32, i64)>> = read_json(path)?;
    raw.into_iter()
        .map(|(k, v)| {
            k.parse::<u32>()
                .map(|u| (u, v))
                .map_err(|_| invalid(path, format!("user key `{k}` is not an index")))
        })
        .collect()
}

/// The newest numbered version directory of a model.
pub fn newest_version(dir: &Path) -> Result<String, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| file_err(dir, e))?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .map(|v| v.to_string())
        .ok_or_else(|| invalid(dir, "no numbered version directory"))
}

impl ModelData {
    /// Reads the newest version of the model directory `dir` (`<repository>/recommender`).
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::load_version(dir, &newest_version(dir)?)
    }

    /// Reads version `version` of the model directory `dir`.
    pub fn load_version(dir: &Path, version: &str) -> Result<Self, LoadError> {
        let toml_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml_path).map_err(|e| file_err(&toml_path, e))?;
        let parsed: ModelToml =
            toml::from_str(&text).map_err(|e| invalid(&toml_path, e.to_string()))?;
        if parsed.kind != "recommender" {
            return Err(invalid(
                &toml_path,
                format!("`kind` must be `recommender`, got `{}`", parsed.kind),
            ));
        }
        let spec = parsed.recommender;
        if spec.genres.len() > 64 {
            return Err(invalid(
                &toml_path,
                format!("at most 64 genres are supported, got {}", spec.genres.len()),
            ));
        }
        let version = version.to_owned();
        let vdir = dir.join(&version);

        let cat_path = vdir.join("catalog.json");
        let cat: CatalogJson = read_json(&cat_path)?;
        let mut catalog = Catalog {
            items: vec![Item::default(); spec.num_items + 1],
            by_id: HashMap::with_capacity(spec.num_items),
            genre_names: spec.genres.clone(),
        };
        for it in cat.items {
            let idx = it.index as usize;
            if idx == 0 || idx > spec.num_items {
                return Err(invalid(
                    &cat_path,
                    format!("item index {idx} outside 1..={}", spec.num_items),
                ));
            }
            let mut mask = 0u64;
            for g in &it.genres {
                match catalog.genre_bit(g) {
                    Some(b) => mask |= b,
                    None => {
                        return Err(invalid(
                            &cat_path,
                            format!("item {} has genre `{g}` not in model.toml", it.item_id),
                        ));
                    }
                }
            }
            catalog.by_id.insert(it.item_id, it.index);
            catalog.items[idx] = Item {
                item_id: it.item_id,
                title: it.title,
                year: it.year.unwrap_or(0),
                genres: mask,
                popularity: it.popularity,
                long_tail: it.long_tail,
            };
        }
        if catalog.by_id.len() != spec.num_items {
            return Err(invalid(
                &cat_path,
                format!(
                    "{} distinct items, model.toml says {}",
                    catalog.by_id.len(),
                    spec.num_items
                ),
            ));
        }

        let users_path = vdir.join("users.json");
        let users_json: UsersJson = read_json(&users_path)?;
        let users = users_json
            .users
            .into_iter()
            .map(|u| (u.user_id, u.index))
            .collect();
        let histories = read_histories(&vdir.join("histories.json"))?;

        let item_features = Matrix::read_npy(&vdir.join("item_features.npy"))?;
        let user_features = Matrix::read_npy(&vdir.join("user_features.npy"))?;
        let title_embeddings = Matrix::read_npy(&vdir.join("title_embeddings.npy"))?;
        let check = |m: &Matrix, name: &str, rows: usize, cols: usize| {
            if m.rows != rows || m.cols != cols {
                Err(invalid(
                    &vdir.join(name),
                    format!("shape [{}, {}], expected [{rows}, {cols}]", m.rows, m.cols),
                ))
            } else {
                Ok(())
            }
        };
        check(
            &item_features,
            "item_features.npy",
            spec.num_items + 1,
            spec.item_feature_names.len(),
        )?;
        check(
            &user_features,
            "user_features.npy",
            spec.num_users + 1,
            spec.user_feature_names.len(),
        )?;
        check(
            &title_embeddings,
            "title_embeddings.npy",
            spec.num_items + 1,
            title_embeddings.cols,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            version,
            spec,
            instance: parsed.instance,
            catalog,
            users,
            histories,
            item_features,
            user_features,
            title_embeddings,
        })
    }

    /// Path of a file in the served version directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(&self.version).join(name)
    }
}
