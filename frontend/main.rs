fn main() {
    println!("zeroconv");
}
