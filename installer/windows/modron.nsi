; Modron's Windows installer (NSIS 3). Built on Linux by installer/build-windows.sh:
;   makensis -WX -DVERSION=0.1.0 -DSTAGE=<folder> -DWHEEL=<wheel file> -DOUTFILE=<exe> modron.nsi
; Per user, no admin: everything goes to %LOCALAPPDATA%\modron\install (the app's data folder is
; %LOCALAPPDATA%\modron, which keeps the user's queue, runs and settings and is left alone).
; Command line (silent installs: /S):
;   /TORCH=cpu|cu118|cu126|cu128|cu130   override the PyTorch build picked for the GPU
;   /CPUFALLBACK   install the CPU build when the GPU build cannot be downloaded (otherwise asked; /S: fail)
;   /AUTOSTART     start Modron at login          /WSL   also set up swarm contribution in WSL2
; Uninstaller: /S silent (keeps your data), /PURGE also deletes your data.

Target amd64-unicode   ; a 64-bit installer (Debian's nsis has the amd64 stubs): 64-bit-only Wine and Windows on ARM
!include "MUI2.nsh"
!include "FileFunc.nsh"
!include "LogicLib.nsh"
!include "Sections.nsh"
!include "TextFunc.nsh"
!include "WordFunc.nsh"

!ifndef VERSION | STAGE | WHEEL | OUTFILE
  !error "build with installer/build-windows.sh (it defines VERSION, STAGE, WHEEL and OUTFILE)"
!endif

!define PYTHON_PIN "3.11"
!define UNINST_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\Modron"
!define RUN_KEY "Software\Microsoft\Windows\CurrentVersion\Run"
!define RUNONCE_KEY "Software\Microsoft\Windows\CurrentVersion\RunOnce"
!define WSL_DISTRO "Modron"

Name "Modron ${VERSION}"
OutFile "${OUTFILE}"
RequestExecutionLevel user
InstallDir "$LOCALAPPDATA\modron\install"
!ifndef COMPRESSOR
  !define COMPRESSOR "/SOLID lzma"   ; the release; build-windows.sh's fast mode (tests) passes zlib
!endif
SetCompressor ${COMPRESSOR}
ShowInstDetails show
ShowUninstDetails show
BrandingText "Modron ${VERSION}"
VIProductVersion "${VERSION}.0"
VIAddVersionKey "ProductName" "Modron"
VIAddVersionKey "FileDescription" "Modron installer"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "LegalCopyright" "Apache-2.0"

Var PY        ; the uv-managed Python
Var UV
Var BUILD     ; the PyTorch build, its requirement and index
Var REQ
Var TORCHVER  ; its torch release: which lock (installer\locks\torch-X.txt) the libraries come from
Var IDX
Var PREVIOUS  ; the version installed before, if any
Var ARGS      ; the command line
Var NEEDS_KB  ; the disk the chosen PyTorch build needs (torch_select's needs_bytes), for "Space required"

!define MUI_ABORTWARNING
; Modron's icon (resources/icons/modron.svg at 48 px, made with Qt's ico writer by make_images.py) for the
; installer, the uninstaller, the Start menu entry and Apps & features (makensis runs in this folder).
!define MUI_ICON "modron.ico"
!define MUI_UNICON "modron.ico"
; Modron's images instead of NSIS's defaults, made from the same SVG by make_images.py (24-bit BMPs): the
; Welcome and Finish pages' bitmap (164x314) and the other pages' header image (150x57).
!define MUI_WELCOMEFINISHPAGE_BITMAP "wizard.bmp"
!define MUI_UNWELCOMEFINISHPAGE_BITMAP "wizard.bmp"
!define MUI_HEADERIMAGE
!define MUI_HEADERIMAGE_BITMAP "header.bmp"
!define MUI_HEADERIMAGE_UNBITMAP "header.bmp"
!define MUI_WELCOMEPAGE_TEXT "This installs Modron ${VERSION} for you (no administrator rights needed) in$\r$\n$\r$\n$LOCALAPPDATA\modron\install$\r$\n$\r$\nIt downloads Python and the PyTorch build that fits your GPU (a few GB for NVIDIA GPUs). Running it again repairs or upgrades the install; your queue, runs and settings are kept."
!insertmacro MUI_PAGE_WELCOME
!insertmacro MUI_PAGE_COMPONENTS
!insertmacro MUI_PAGE_INSTFILES
!define MUI_FINISHPAGE_RUN "$INSTDIR\venv\Scripts\pythonw.exe"
!define MUI_FINISHPAGE_RUN_PARAMETERS "-m app.main"
!define MUI_FINISHPAGE_RUN_TEXT "Start Modron"
!insertmacro MUI_PAGE_FINISH
!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES
!insertmacro MUI_LANGUAGE "English"

; --- helpers ---------------------------------------------------------------------------------------------

!macro Say TEXT   ; to the details window and the log (TEXT may hold quotes, not backticks)
  DetailPrint `${TEXT}`
  FileOpen $9 "$INSTDIR\install.log" a
  FileSeek $9 0 END
  FileWrite $9 `${TEXT}$\r$\n`
  FileClose $9
!macroend

!macro Logged CMD   ; run CMD with its output appended to the log; leaves the exit status in $0
  !insertmacro Say `$$ ${CMD}`
  nsExec::Exec '"$SYSDIR\cmd.exe" /S /C "${CMD} >>"$INSTDIR\install.log" 2>&1"'
  Pop $0
!macroend

!macro LastLogLine VAR   ; why the command just run failed: the log's last line, where uv prints its root cause
  ${LineRead} "$INSTDIR\install.log" "-1" ${VAR}
  ${TrimNewLines} ${VAR} ${VAR}
  ${Do}   ; uv indents it as "  cause: ..."; the user reads only the cause
    StrCpy $R9 ${VAR} 1
    ${IfThen} $R9 != " " ${|} ${ExitDo} ${|}
    StrCpy ${VAR} ${VAR} "" 1
  ${Loop}
  StrCpy $R9 ${VAR} 7
  ${IfThen} $R9 == "cause: " ${|} StrCpy ${VAR} ${VAR} "" 7 ${|}
  ; No output at all: the last line is our own "$ command" (the program could not start, e.g. a missing DLL
  ; or blocked by antivirus); quoting it would read as the cause. Give the exit status instead.
  StrCpy $R9 ${VAR} 2
  ${If} $R9 == "$$ "
    StrCpy $R9 $0
    ${IfThen} $0 < 0 ${|} IntFmt $R9 "0x%08X" $0 ${|}   ; an NTSTATUS, as Windows' docs write it (0xC0000135)
    StrCpy ${VAR} "it printed nothing and exited with status $R9"
  ${EndIf}
!macroend

!macro Fail TEXT
  !insertmacro Say "FAILED: ${TEXT}"
  RMDir /r "$INSTDIR\venv.new"
  MessageBox MB_OK|MB_ICONSTOP "${TEXT}$\r$\n$\r$\nEverything the installer did is in $INSTDIR\install.log." /SD IDOK
  SetErrorLevel 1
  Quit
!macroend

!macro Field NAME VAR   ; a field of the saved PyTorch choice
  nsExec::ExecToStack '"$PY" "$INSTDIR\installer\torch_select.py" --from "$INSTDIR\torch-choice.json" --field ${NAME}'
  Pop $0
  Pop ${VAR}
  ${TrimNewLines} ${VAR} ${VAR}
!macroend

; --- sections ----------------------------------------------------------------------------------------------

Section "Modron" SecMain
  SectionIn RO
  CreateDirectory "$INSTDIR"
  ReadRegStr $PREVIOUS HKCU "${UNINST_KEY}" "DisplayVersion"
  !insertmacro Say "===== Modron ${VERSION} installer (before: $PREVIOUS) $ARGS"
  RMDir /r "$INSTDIR\venv.new"
  RMDir /r "$INSTDIR\venv.old"

  SetOutPath "$INSTDIR\installer"
  File "${STAGE}\uv.exe"
  File "${STAGE}\torch_select.py"
  File "${STAGE}\write_record.py"
  File "${STAGE}\${WHEEL}"
  File /r "${STAGE}\locks"   ; the release's dependency locks (installer/lock.py)
  ${If} "$EXEPATH" != "$INSTDIR\Modron-Setup.exe"
    CopyFiles /SILENT "$EXEPATH" "$INSTDIR\Modron-Setup.exe"   ; "Repair install" reruns this copy
  ${EndIf}
  ; The uninstaller and the Apps & features entry come first: an install that fails or is cancelled from here
  ; on is removed in one click and leaves nothing. (An upgrade's entry keeps the old version until step 6.)
  SetOutPath "$INSTDIR"
  File "modron.ico"
  WriteUninstaller "$INSTDIR\Uninstall.exe"
  WriteRegStr HKCU "${UNINST_KEY}" "DisplayName" "Modron"
  WriteRegStr HKCU "${UNINST_KEY}" "DisplayIcon" "$INSTDIR\modron.ico"
  ; No DisplayVersion yet, not even on a first install: a rerun after a failed one would read it as the
  ; version installed before (the log's "before:", the record's "previous") with nothing installed.
  WriteRegStr HKCU "${UNINST_KEY}" "Publisher" "The Modron project"
  WriteRegStr HKCU "${UNINST_KEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKCU "${UNINST_KEY}" "UninstallString" '"$INSTDIR\Uninstall.exe"'
  WriteRegStr HKCU "${UNINST_KEY}" "QuietUninstallString" '"$INSTDIR\Uninstall.exe" /S'
  WriteRegDWORD HKCU "${UNINST_KEY}" "NoModify" 1
  WriteRegDWORD HKCU "${UNINST_KEY}" "NoRepair" 1
  StrCpy $UV "$INSTDIR\installer\uv.exe"
  System::Call 'Kernel32::SetEnvironmentVariable(t "UV_PYTHON_INSTALL_DIR", t "$INSTDIR\python")i'
  System::Call 'Kernel32::SetEnvironmentVariable(t "UV_CACHE_DIR", t "$INSTDIR\cache")i'
  System::Call 'Kernel32::SetEnvironmentVariable(t "UV_NO_CONFIG", t "1")i'
  System::Call 'Kernel32::SetEnvironmentVariable(t "UV_NO_PROGRESS", t "1")i'
  System::Call 'Kernel32::SetEnvironmentVariable(t "VIRTUAL_ENV", n)i'

  !insertmacro Say "[1/7] Getting Python ${PYTHON_PIN}"
  ; --no-bin --no-registry: nothing outside $INSTDIR (uv would otherwise add python3.11.exe to
  ; %USERPROFILE%\.local\bin and register it under HKCU\Software\Python, which the uninstaller would leave).
  !insertmacro Logged '"$UV" python install --no-bin --no-registry ${PYTHON_PIN}'
  ${If} $0 != 0
    !insertmacro LastLogLine $1
    !insertmacro Fail "Python ${PYTHON_PIN} could not be downloaded ($1). Check the internet connection and run the installer again."
  ${EndIf}
  nsExec::ExecToStack '"$UV" python find --managed-python ${PYTHON_PIN}'
  Pop $0
  Pop $PY
  ${TrimNewLines} $PY $PY

  !insertmacro Say "[2/7] Looking at the GPUs (nvidia-smi) to pick the PyTorch build"
  ${GetOptions} $ARGS "/TORCH=" $1
  ${If} $1 != ""
    StrCpy $1 "--torch $1"
  ${EndIf}
  !insertmacro Logged '"$PY" "$INSTDIR\installer\torch_select.py" --platform windows --out "$INSTDIR\torch-choice.json" $1'
  ${If} $0 != 0
    !insertmacro Fail "Could not pick a PyTorch build (see the log)."
  ${EndIf}
  !insertmacro Field build $BUILD
  !insertmacro Field requirement $REQ
  !insertmacro Field torch $TORCHVER
  !insertmacro Field index_url $IDX
  !insertmacro Field reasons $2
  !insertmacro Say "PyTorch build: $BUILD ($REQ). $2"

  !insertmacro Say "[3/7] Checking free disk space"
  !insertmacro Field needs_mb $2
  ${GetRoot} "$INSTDIR" $3
  ${DriveSpace} "$3\" "/D=F /S=M" $4
  ${If} $4 < $2
    !insertmacro Fail "Not enough disk space: the $BUILD build of PyTorch needs about $2 MB on $3 and only $4 MB are free. Free some space and run the installer again."
  ${EndIf}

  !insertmacro Say "[4/7] Installing PyTorch ($BUILD) into a fresh environment; this can take a while"
  !insertmacro Logged '"$UV" venv --relocatable --python "$PY" "$INSTDIR\venv.new"'
  ${If} $0 != 0
    !insertmacro Fail "Could not create the environment in $INSTDIR\venv.new."
  ${EndIf}
  !insertmacro Logged '"$UV" pip install --python "$INSTDIR\venv.new\Scripts\python.exe" --index-url $IDX $REQ'
  ${If} $0 != 0
    ${If} $BUILD == "cpu"
      !insertmacro Fail "Could not download PyTorch ($REQ) from $IDX. Check the internet connection and run the installer again."
    ${EndIf}
    ClearErrors
    ${GetOptions} $ARGS "/CPUFALLBACK" $1
    ${If} ${Errors}
      MessageBox MB_YESNO|MB_ICONQUESTION "Could not download PyTorch for your GPU ($REQ) from $IDX.$\r$\n$\r$\nInstall the CPU build instead? Training will be much slower; run the installer again later to get the GPU build." /SD IDNO IDYES fallback
      !insertmacro Fail "Could not download PyTorch ($REQ) from $IDX. Check the internet connection and run the installer again (or with /CPUFALLBACK for the CPU build)."
    ${EndIf}
    fallback:
    !insertmacro Say "Falling back to the CPU build of PyTorch, as you agreed"
    !insertmacro Logged '"$PY" "$INSTDIR\installer\torch_select.py" --platform windows --torch cpu --out "$INSTDIR\torch-choice.json"'
    !insertmacro Field requirement $REQ
    !insertmacro Field torch $TORCHVER
    !insertmacro Field index_url $IDX
    !insertmacro Logged '"$UV" pip install --python "$INSTDIR\venv.new\Scripts\python.exe" --index-url $IDX $REQ'
    ${If} $0 != 0
      !insertmacro Fail "Could not download the CPU build of PyTorch either. Check the internet connection and run the installer again."
    ${EndIf}
  ${EndIf}

  ; The libraries at the versions locked for this release and this torch, hashes checked, nothing unlocked.
  !insertmacro Say "[5/7] Installing Modron ${VERSION} and the libraries it uses (the versions locked for this release, from PyPI)"
  !insertmacro Logged '"$UV" pip install --python "$INSTDIR\venv.new\Scripts\python.exe" --require-hashes --no-deps -r "$INSTDIR\installer\locks\torch-$TORCHVER.txt"'
  ${If} $0 != 0
    !insertmacro LastLogLine $1
    !insertmacro Fail "Could not download the libraries Modron needs from PyPI ($1). Check the internet connection and run the installer again."
  ${EndIf}
  !insertmacro Logged '"$UV" pip install --python "$INSTDIR\venv.new\Scripts\python.exe" --no-deps "$INSTDIR\installer\${WHEEL}"'
  ${If} $0 != 0
    !insertmacro Fail "Could not install Modron's own package (see the log)."
  ${EndIf}
  !insertmacro Logged '"$UV" pip check --python "$INSTDIR\venv.new\Scripts\python.exe"'
  ${If} $0 != 0
    !insertmacro Fail "The installed libraries do not fit together (see the log). Run the installer again."
  ${EndIf}

  !insertmacro Say "[6/7] Putting it in place: Start menu, Apps & features, record"
  ${If} ${FileExists} "$INSTDIR\venv\*.*"
    ClearErrors
    Rename "$INSTDIR\venv" "$INSTDIR\venv.old"
    ${If} ${Errors}
      !insertmacro Fail "Modron is running from the old install: quit it (tray menu, Quit) and run the installer again."
    ${EndIf}
  ${EndIf}
  Rename "$INSTDIR\venv.new" "$INSTDIR\venv"
  RMDir /r "$INSTDIR\venv.old"
  CreateShortcut "$SMPROGRAMS\Modron.lnk" "$INSTDIR\venv\Scripts\pythonw.exe" "-m app.main" "$INSTDIR\modron.ico" 0 SW_SHOWNORMAL "" "Finetune language models on your own GPU"
  WriteRegStr HKCU "${UNINST_KEY}" "DisplayVersion" "${VERSION}"   ; now the new version is the one in place
  ${GetSize} "$INSTDIR" "/S=0K" $1 $2 $3
  WriteRegDWORD HKCU "${UNINST_KEY}" "EstimatedSize" $1
  !insertmacro Logged '"$INSTDIR\venv\Scripts\python.exe" "$INSTDIR\installer\write_record.py" --choice "$INSTDIR\torch-choice.json" --version ${VERSION} --previous "$PREVIOUS" --menu-entry "$SMPROGRAMS\Modron.lnk" --autostart-entry "HKCU\${RUN_KEY}\Modron" --uninstaller "$INSTDIR\Uninstall.exe" --log "$INSTDIR\install.log" -- "$INSTDIR\Modron-Setup.exe"'
  ${If} $0 != 0
    !insertmacro Fail "Could not write the install record $INSTDIR\install.json."
  ${EndIf}
  Delete "$INSTDIR\torch-choice.json"

  !insertmacro Say "[7/7] Checking the install (modron --self-test: a few training steps)"
  !insertmacro Logged '"$INSTDIR\venv\Scripts\modron.exe" --self-test'
  ${If} $0 != 0
    !insertmacro Fail "Modron is installed, but its self-test failed. Run the installer again to repair it."
  ${EndIf}
  !insertmacro Say "Modron ${VERSION} is installed."
SectionEnd

Section /o "Start at login" SecAutostart
  WriteRegStr HKCU "${RUN_KEY}" "Modron" '"$INSTDIR\venv\Scripts\pythonw.exe" -m app.main --background'
SectionEnd

Section /o "Set up swarm contribution" SecWsl
  ; The app runs the swarm worker as: wsl.exe -d Modron -- ~/modron/venv/bin/python -m training_core.cli swarm join
  System::Call 'Kernel32::SetEnvironmentVariable(t "WSL_UTF8", t "1")i'
  !insertmacro Logged '"$SYSDIR\wsl.exe" --status'
  ${If} $0 != 0
    !insertmacro Say "Installing WSL2 (Windows asks for a restart; setup goes on after it)"
    !insertmacro Logged '"$SYSDIR\wsl.exe" --install --no-distribution'
    ${If} $0 != 0
      !insertmacro Fail "WSL2 could not be installed (it needs Windows 10 2004 or newer with virtualization on). Modron itself is installed; run the installer again to retry."
    ${EndIf}
    WriteRegStr HKCU "${RUNONCE_KEY}" "ModronWsl" '"$INSTDIR\Modron-Setup.exe" /WSL'
    SetRebootFlag true
    Return
  ${EndIf}
  nsExec::ExecToStack '"$SYSDIR\wsl.exe" --list --quiet'
  Pop $0
  Pop $1
  ClearErrors
  ${WordFind} "$1" "${WSL_DISTRO}" "E+1{" $2
  ${If} ${Errors}
    !insertmacro Say "Creating the WSL2 distribution ${WSL_DISTRO} (Ubuntu)"
    !insertmacro Logged '"$SYSDIR\wsl.exe" --install Ubuntu-24.04 --name ${WSL_DISTRO} --no-launch'
    ${If} $0 != 0
      !insertmacro Fail "The WSL2 distribution ${WSL_DISTRO} could not be created (see the log). Modron itself is installed; run the installer again to retry."
    ${EndIf}
  ${EndIf}
  !insertmacro Say "Installing the swarm worker in ${WSL_DISTRO}"
  !insertmacro Logged '"$SYSDIR\wsl.exe" -d ${WSL_DISTRO} -u root -- sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv"'
  !insertmacro Logged '"$SYSDIR\wsl.exe" -d ${WSL_DISTRO} -- sh -c "python3 -m venv ~/modron/venv && ~/modron/venv/bin/pip install -q --index-url $IDX $REQ && ~/modron/venv/bin/pip install -q --require-hashes --no-deps -r $$(wslpath -u $\'$INSTDIR\installer\locks\torch-$TORCHVER.txt$\') && ~/modron/venv/bin/pip install -q --no-deps $$(wslpath -u $\'$INSTDIR\installer\${WHEEL}$\')"'
  ${If} $0 != 0
    !insertmacro Fail "The swarm worker could not be installed in WSL2 (see the log). Modron itself is installed; run the installer again to retry."
  ${EndIf}
SectionEnd

LangString DESC_SecMain ${LANG_ENGLISH} "Modron (required), Python, and the PyTorch build for your GPU: the space shown is for that build."
LangString DESC_SecAutostart ${LANG_ENGLISH} "Start Modron in the tray when you log in to Windows."
LangString DESC_SecWsl ${LANG_ENGLISH} "Lend your GPU to community training runs: installs WSL2 where missing (asks for a restart) and a Linux distribution named Modron with the swarm worker in it."
!insertmacro MUI_FUNCTION_DESCRIPTION_BEGIN
  !insertmacro MUI_DESCRIPTION_TEXT ${SecMain} $(DESC_SecMain)
  !insertmacro MUI_DESCRIPTION_TEXT ${SecAutostart} $(DESC_SecAutostart)
  !insertmacro MUI_DESCRIPTION_TEXT ${SecWsl} $(DESC_SecWsl)
!insertmacro MUI_FUNCTION_DESCRIPTION_END

Function .onInit
  ${GetParameters} $ARGS
  ; "Space required": what the PyTorch build needs (torch_select.py's needs_bytes: a CUDA build 9 GB, the CPU
  ; build 3 GB), not the few MB this file holds. The build is picked later, with Python; an NVIDIA driver that
  ; answers nvidia-smi means a CUDA build, and /TORCH= says it outright.
  StrCpy $NEEDS_KB 3145728
  nsExec::ExecToStack '"nvidia-smi" -L'
  Pop $0
  Pop $1
  ${If} $0 == 0
    StrCpy $NEEDS_KB 9437184
  ${EndIf}
  ClearErrors
  ${GetOptions} $ARGS "/TORCH=" $1
  ${IfNot} ${Errors}
    StrCpy $NEEDS_KB 9437184
    ${If} $1 == "cpu"
      StrCpy $NEEDS_KB 3145728
    ${EndIf}
  ${EndIf}
  SectionSetSize ${SecMain} $NEEDS_KB
  ClearErrors
  ${GetOptions} $ARGS "/AUTOSTART" $0
  ${IfNot} ${Errors}
    !insertmacro SelectSection ${SecAutostart}
  ${EndIf}
  ClearErrors
  ${GetOptions} $ARGS "/WSL" $0
  ${IfNot} ${Errors}
    !insertmacro SelectSection ${SecWsl}
  ${EndIf}
  ClearErrors
FunctionEnd

; --- uninstaller -------------------------------------------------------------------------------------------

Section "Uninstall"
  ; $INSTDIR is ...\modron\install; the folder above holds the user's data.
  Delete "$SMPROGRAMS\Modron.lnk"
  DeleteRegValue HKCU "${RUN_KEY}" "Modron"
  DeleteRegValue HKCU "${RUNONCE_KEY}" "ModronWsl"
  DeleteRegKey HKCU "${UNINST_KEY}"
  RMDir /r "$INSTDIR"
  ${GetParent} "$INSTDIR" $1
  ${GetParameters} $2
  ClearErrors
  ${GetOptions} $2 "/PURGE" $0
  ${If} ${Errors}
    MessageBox MB_YESNO|MB_ICONQUESTION|MB_DEFBUTTON2 "Also delete your Modron data (queue, history, runs and checkpoints, settings) in $1?" /SD IDNO IDNO keep
  ${EndIf}
  ${GetFileName} "$1" $3
  ${If} $3 != "modron"   ; installed with /D= somewhere else: never delete a folder we did not make
    Goto keep
  ${EndIf}
  RMDir /r "$1"
  RMDir /r "$LOCALAPPDATA\modron\Cache"
  Goto done
  keep:
  RMDir "$1"   ; only when empty
  done:
SectionEnd
