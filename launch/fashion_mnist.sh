#!/usr/bin/env bash
# Fashion-MNIST for configs/vision.py: Debian's dataset-fashion-mnist package (four IDX files under
# /usr/share/datasets/fashion-mnist). Installed with apt-get when missing and this user may (root,
# or sudo without a password); otherwise one error line saying how, exit 2. Sourced by
# launch/local.sh for configs/vision.py unless --config.data.dir points elsewhere.
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -e "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    as_root=()
  elif command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
    as_root=(sudo)
  else
    echo "error: Fashion-MNIST is not installed in $FASHION_MNIST_DIR; run" \
      "'sudo apt-get install dataset-fashion-mnist', or pass --config.data.dir=<a directory with" \
      "its four IDX files>" >&2
    exit 2
  fi
  echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST, 30 MB)"
  "${as_root[@]}" apt-get install -y -q dataset-fashion-mnist > /dev/null \
    || { "${as_root[@]}" apt-get update -q > /dev/null \
      && "${as_root[@]}" apt-get install -y -q dataset-fashion-mnist > /dev/null; }
fi
