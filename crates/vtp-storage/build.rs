fn main() {
    // Migrations are embedded with `sqlx::migrate!`; rebuild when they change.
    println!("cargo:rerun-if-changed=migrations");
}
