#!/usr/bin/env bash
# Installs the fonts and the word list that `clip4str synth` draws from (Debian / Ubuntu packages).
# Idempotent: when everything is installed it only asks dpkg and exits. Packages this release does not
# have are skipped with a note rather than failing the run. Tests do not need any of this (they use the
# committed tests/fixtures/fonts); training-set quality does.
set -euo pipefail

PACKAGES=(
  # The families the issue names
  fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-urw-base35 fonts-noto-core
  fonts-roboto-unhinted fonts-open-sans fonts-lato fonts-texgyre
  fonts-adf-accanthis fonts-adf-berenis fonts-adf-gillius fonts-adf-universalis
  # More designs: serif, sans, mono, rounded, script and handwriting
  fonts-crosextra-caladea fonts-crosextra-carlito fonts-freefont-ttf fonts-cantarell
  fonts-linuxlibertine fonts-ebgaramond fonts-cabin fonts-comfortaa fonts-jura fonts-go fonts-hack
  fonts-inconsolata fonts-anonymous-pro fonts-sil-gentium fonts-league-spartan fonts-averia-gwf
  fonts-lobster fonts-dancingscript fonts-femkeklaver fonts-breip
  # Dictionary words (/usr/share/dict/words)
  wamerican
)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-fonts: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
available=()
for package in "${missing[@]}"; do
  if apt-cache show "$package" >/dev/null 2>&1; then
    available+=("$package")
  else
    echo "install-fonts: $package is not available here, skipped" >&2
  fi
done
if [ ${#available[@]} -gt 0 ]; then
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${available[@]}"
fi
echo "install-fonts: installed ${#available[@]} of ${#missing[@]} missing packages"
