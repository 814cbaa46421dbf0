//! The database each test gets: a fresh SQLite file, or with `TEST_BACKEND=postgres` a
//! fresh PostgreSQL database on the server named by `TEST_DATABASE_URL_POSTGRES`, dropped
//! when the test is done.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

/// Where the PostgreSQL server for tests is: a URL whose user may create databases.
pub const POSTGRES_URL_VARIABLE: &str = "TEST_DATABASE_URL_POSTGRES";

/// Whether this run of the suite is the PostgreSQL one.
pub fn on_postgres() -> bool {
    std::env::var("TEST_BACKEND").is_ok_and(|backend| backend == "postgres")
}

/// The administrative URL of the test server, when one is configured.
pub fn postgres_server() -> Option<String> {
    std::env::var(POSTGRES_URL_VARIABLE)
        .ok()
        .filter(|url| !url.is_empty())
}

/// One test's database; dropping it removes it.
pub enum TestDatabase {
    Sqlite {
        url: String,
        path: std::path::PathBuf,
        _dir: TempDir,
    },
    Postgres {
        url: String,
        server: String,
        name: String,
    },
}

impl TestDatabase {
    pub async fn create() -> Self {
        if on_postgres() {
            let server = postgres_server()
                .unwrap_or_else(|| panic!("TEST_BACKEND=postgres needs {POSTGRES_URL_VARIABLE}"));
            Self::create_postgres(server).await
        } else {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokenchat.db");
            Self::Sqlite {
                url: format!("sqlite://{}", path.display()),
                path,
                _dir: dir,
            }
        }
    }

    /// A fresh, empty database on `server`.
    pub async fn create_postgres(server: String) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tokenchat_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        let mut admin = PgConnection::connect(&server).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        let mut url = reqwest::Url::parse(&server).unwrap();
        url.set_path(&name);
        Self::Postgres {
            url: url.to_string(),
            server,
            name,
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Self::Sqlite { url, .. } | Self::Postgres { url, .. } => url,
        }
    }

    /// The SQLite file, for the tests that read it; `None` on PostgreSQL.
    pub fn sqlite_file(&self) -> Option<&std::path::Path> {
        match self {
            Self::Sqlite { path, .. } => Some(path),
            Self::Postgres { .. } => None,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Self::Postgres { server, name, .. } = self else {
            return;
        };
        let (server, database) = (server.clone(), name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&server).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {name}: {dropped:?}");
        }
    }
}
