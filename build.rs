//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the migrations at compile
//! time, and Cargo does not otherwise notice a new file in their folders.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
