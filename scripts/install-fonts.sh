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
  # Phase 5 on: every Debian font package with Latin text designs (189 training families in all). Left out on
  # purpose: fonts-aenigma (Brian Kent's ~250 novelty display faces would be more than half of all families).
  fonts-adf-baskervald fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus
  fonts-adf-oldania fonts-adf-romande fonts-adf-solothurn fonts-adf-switzera fonts-adf-tribun
  fonts-adf-verana fonts-agave fonts-allerta fonts-arkpandora fonts-averia-sans-gwf fonts-averia-serif-gwf
  fonts-b612 fonts-bajaderka fonts-beteckna fonts-blankenburg fonts-cabinsketch fonts-campania
  fonts-cardo fonts-century-catalogue fonts-clear-sans fonts-cmu fonts-comic-neue fonts-courier-prime
  fonts-croscore fonts-dosis fonts-dustin fonts-ebgaramond-extra fonts-ecolier-court fonts-elstob
  fonts-eurofurence fonts-f500 fonts-fantasque-sans fonts-fanwood fonts-firacode fonts-freefont-otf
  fonts-georgewilliams fonts-gfs-artemisia fonts-gfs-baskerville fonts-gfs-bodoni-classic fonts-gfs-didot
  fonts-gfs-neohellenic fonts-gnutypewriter fonts-gotico-antiqua fonts-goudybookletter fonts-hermit
  fonts-humor-sans fonts-inter fonts-isabella fonts-jetbrains-mono fonts-junction fonts-junicode fonts-karla
  fonts-kaushanscript fonts-kristi fonts-league-mono fonts-leckerli-one fonts-lemonada fonts-levien-museum
  fonts-levien-typoscript fonts-liberation fonts-lindenhill fonts-lmodern fonts-lobstertwo fonts-manrope
  fonts-monofur fonts-mononoki fonts-mph-2b-damase fonts-national-park fonts-noto-extra fonts-ocr-b
  fonts-okolaks fonts-oldstandard fonts-opendin fonts-opendyslexic fonts-oxygen fonts-paratype fonts-pc
  fonts-play fonts-prociono fonts-quattrocento fonts-quicksand fonts-radisnoir fonts-roadgeek
  fonts-roboto-slab fonts-routed-gothic fonts-rufscript fonts-sil-andika fonts-sil-charis fonts-sil-doulos
  fonts-sil-gentiumplus fonts-sjfonts fonts-sora fonts-spleen fonts-staypuft fonts-stix fonts-tiresias
  fonts-tlwg-garuda-ttf fonts-tlwg-kinnari-ttf fonts-tlwg-laksaman-ttf fonts-tlwg-loma-ttf
  fonts-tlwg-mono-ttf fonts-tlwg-norasi-ttf fonts-tlwg-purisa-ttf fonts-tlwg-sawasdee-ttf
  fonts-tlwg-typewriter-ttf fonts-tlwg-typist-ttf fonts-tlwg-typo-ttf fonts-tlwg-umpush-ttf
  fonts-tlwg-waree-ttf fonts-tomsontalks fonts-train fonts-tuffy fonts-ubuntu-title fonts-unfonts-core
  fonts-uralic fonts-vollkorn fonts-wine fonts-yanone-kaffeesatz fonts-yrsa-rasa
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
