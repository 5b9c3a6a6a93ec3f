"""What every stage uses: rank-0 console output and the error type, the one error path, atomic
file writes, rank-failure handling, huge pages for host memory and the Pillow plotting primitives.
Nothing here imports from the rest of dcdit."""
